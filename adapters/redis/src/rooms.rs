//! Shared rooms on Redis: each room's members, log and offsets, and the
//! channel its new entries are published on.
//!
//! Per room `R` (under the backplane's prefix): `room:R:meta`, a hash with
//! the log's `epoch` and its last offset `top`; `room:R:log`, a stream
//! whose entry IDs are `{offset}-1`, trimmed to the newest `history`
//! entries; `room:R:members`, a hash from session (hex) to
//! `{node}\n{member JSON}`; `room:R:pubs`, a hash from session to the id
//! of its last publish the room took (a publish sent again after a crash
//! is not appended twice; kept until the session ends, or the room); and the channel `room:R`, on which each entry
//! is published as `{epoch}:{offset}:{entry}`. Per node `N`:
//! `node-rooms:N`, the rooms where `N` has (or had) members; and
//! `room-nodes`, every such node.
//!
//! Every change is one Lua script, so each is atomic: a batch of
//! operations runs as one script, in order, in one round trip. An epoch is
//! made from the server's clock in microseconds when a room has no log
//! (new, emptied, or lost with the rest of Redis's data), so a log made
//! again never reuses one. This file owns the scripts and the parsing of
//! their replies; what goes in an entry is the server's, and the scripts
//! never look inside one but to write the join (`J`) and leave (`L`)
//! announcements the backplane's docs describe.
//!
//! Scripts reach keys they compute from the prefix: one Redis server (or
//! a primary with replicas), not Redis Cluster.

use kitestring::backplane::{RoomCommand, RoomLog, RoomMember, RoomReply, Swept};
use kitestring::BackplaneError;
use redis::Value;

/// Functions every script starts with.
const PRELUDE: &str = r#"
local prefix = ARGV[1]
local function keys(room)
  local base = prefix .. 'room:' .. room
  return base .. ':meta', base .. ':log', base .. ':members', base, base .. ':pubs'
end
local function epoch_of(meta, log)
  local e = redis.call('HGET', meta, 'epoch')
  if not e then
    local t = redis.call('TIME')
    e = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
    redis.call('DEL', log)
    redis.call('HSET', meta, 'epoch', e, 'top', 0)
  end
  return e
end
local function append(room, entry, keep)
  local meta, log, _, chan = keys(room)
  local e = epoch_of(meta, log)
  local top = redis.call('HINCRBY', meta, 'top', 1)
  local id = string.format('%.0f', top)
  redis.call('XADD', log, 'MAXLEN', keep, id .. '-1', 'e', entry)
  redis.call('PUBLISH', chan, e .. ':' .. id .. ':' .. entry)
  return e, top
end
local function member_of(v)
  local nl = string.find(v, '\n', 1, true)
  return string.sub(v, 1, nl - 1), string.sub(v, nl + 1)
end
"#;

/// A batch: ARGV = prefix, history, node, then six arguments per command
/// (`A` room entry, `J` room session member flags max, `L` room session
/// announce), padded with empty strings.
pub(crate) const BATCH: &str = r#"
local keep = tonumber(ARGV[2])
local node = ARGV[3]
local out = {}
local i = 4
while i <= #ARGV do
  local kind, room = ARGV[i], ARGV[i + 1]
  local meta, log, members, _, pubs = keys(room)
  if kind == 'A' then
    local session, id = ARGV[i + 3], ARGV[i + 4]
    local again = false
    if session ~= '' then
      local last = redis.call('HGET', pubs, session)
      if last and tonumber(last) >= tonumber(id) then
        again = true
      else
        redis.call('HSET', pubs, session, id)
      end
    end
    if again then
      local e = epoch_of(meta, log)
      local top = tonumber(redis.call('HGET', meta, 'top'))
      out[#out + 1] = {'A', e, top, redis.call('HLEN', members), 1}
    else
      local e, top = append(room, ARGV[i + 2], keep)
      out[#out + 1] = {'A', e, top, redis.call('HLEN', members), 0}
    end
  elseif kind == 'J' then
    local session, member, flags, max = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], tonumber(ARGV[i + 5])
    local had = redis.call('HEXISTS', members, session) == 1
    if not had and redis.call('HLEN', members) >= max then
      out[#out + 1] = {'F'}
    else
      redis.call('HSET', members, session, node .. '\n' .. member)
      redis.call('SADD', prefix .. 'node-rooms:' .. node, room)
      redis.call('SADD', prefix .. 'room-nodes', node)
      local e, at
      if not had and string.sub(flags, 1, 1) == '1' then
        e, at = append(room, 'J' .. session .. member, keep)
      else
        e = epoch_of(meta, log)
        at = tonumber(redis.call('HGET', meta, 'top'))
      end
      local reply = {'J', e, at}
      if string.sub(flags, 2, 2) == '1' then
        local all = redis.call('HVALS', members)
        for k = 1, #all do
          local _, m = member_of(all[k])
          reply[#reply + 1] = m
        end
      end
      out[#out + 1] = reply
    end
  elseif kind == 'L' then
    local session, announce, ended = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    if ended == '1' then
      redis.call('HDEL', pubs, session)
    end
    local v = redis.call('HGET', members, session)
    if not v then
      out[#out + 1] = {'L', 0}
    else
      redis.call('HDEL', members, session)
      if redis.call('HLEN', members) == 0 then
        redis.call('DEL', meta, log, pubs)
      elseif announce == '1' then
        local _, m = member_of(v)
        append(room, 'L' .. m, keep)
      end
      out[#out + 1] = {'L', 1}
    end
  end
  i = i + 6
end
return out
"#;

/// A log read: ARGV = prefix, room, after, count. Returns epoch, top, then
/// the entries as XRANGE gives them.
pub(crate) const READ: &str = r#"
local meta, log = keys(ARGV[2])
local e = epoch_of(meta, log)
local top = tonumber(redis.call('HGET', meta, 'top'))
local after = tonumber(ARGV[3])
local out = {e, top}
if after < top then
  local from = string.format('%.0f', after + 1) .. '-0'
  local entries = redis.call('XRANGE', log, from, '+', 'COUNT', tonumber(ARGV[4]))
  for k = 1, #entries do
    out[#out + 1] = entries[k]
  end
end
return out
"#;

/// A sweep: ARGV = prefix, room, node, announce, history. Returns removed,
/// remaining.
pub(crate) const SWEEP: &str = r#"
local room, node, announce, keep = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local meta, log, members, _, pubs = keys(room)
local all = redis.call('HGETALL', members)
local left, remaining = {}, 0
for k = 1, #all, 2 do
  local session = all[k]
  local n, m = member_of(all[k + 1])
  local owner = redis.call('GET', prefix .. 'session:' .. session)
  if n == node and owner and owner ~= node then
    -- Taken up by another node, which records it as its own next.
    remaining = remaining + 1
  elseif n == node then
    if redis.call('EXISTS', prefix .. 'image:' .. session) == 1 then
      remaining = remaining + 1
    else
      redis.call('HDEL', members, session)
      left[#left + 1] = m
    end
  end
end
if #left > 0 then
  if redis.call('HLEN', members) == 0 then
    redis.call('DEL', meta, log, pubs)
  elseif announce == '1' then
    append(room, 'L' .. table.concat(left, '\n'), keep)
  end
end
if remaining == 0 then
  redis.call('SREM', prefix .. 'node-rooms:' .. node, room)
end
return {#left, remaining}
"#;

/// Strikes a node with no rooms left: ARGV = prefix, node.
pub(crate) const FORGET: &str = r#"
if redis.call('SCARD', prefix .. 'node-rooms:' .. ARGV[2]) == 0 then
  redis.call('SREM', prefix .. 'room-nodes', ARGV[2])
end
return 1
"#;

/// A script with the prelude.
pub(crate) fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}{body}"))
}

/// The arguments of a batch after the prefix, history and node.
pub(crate) fn batch_args(commands: &[RoomCommand]) -> Vec<Vec<u8>> {
    let mut args = Vec::with_capacity(commands.len() * 6);
    for c in commands {
        let mut six: [Vec<u8>; 6] = Default::default();
        match c {
            RoomCommand::Append { room, entry, once } => {
                six[0] = b"A".to_vec();
                six[1] = room.clone().into_bytes();
                six[2] = entry.clone();
                if let Some((session, id)) = once {
                    six[3] = session.clone().into_bytes();
                    six[4] = id.to_string().into_bytes();
                }
            }
            RoomCommand::Join {
                room,
                session,
                member,
                announce,
                snapshot,
                max_members,
            } => {
                six[0] = b"J".to_vec();
                six[1] = room.clone().into_bytes();
                six[2] = session.clone().into_bytes();
                six[3] = member.clone();
                six[4] = format!("{}{}", u8::from(*announce), u8::from(*snapshot)).into_bytes();
                six[5] = max_members.to_string().into_bytes();
            }
            RoomCommand::Leave {
                room,
                session,
                announce,
                ended,
            } => {
                six[0] = b"L".to_vec();
                six[1] = room.clone().into_bytes();
                six[2] = session.clone().into_bytes();
                six[4] = if *ended { b"1".to_vec() } else { b"0".to_vec() };
                six[3] = if *announce {
                    b"1".to_vec()
                } else {
                    b"0".to_vec()
                };
            }
            // Commands this backplane does not know: an empty kind, which
            // the script skips; the reply is missing and the batch fails.
            _ => {}
        }
        args.extend(six);
    }
    args
}

fn bad(what: &str) -> BackplaneError {
    BackplaneError(format!("unexpected reply from Redis: {what}"))
}

fn int(v: &Value) -> Result<u64, BackplaneError> {
    match v {
        Value::Int(n) => u64::try_from(*n).map_err(|_| bad("a negative number")),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("not a number")),
        Value::SimpleString(s) => s.parse().map_err(|_| bad("not a number")),
        _ => Err(bad("not a number")),
    }
}

fn bytes(v: Value) -> Result<Vec<u8>, BackplaneError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        _ => Err(bad("not a string")),
    }
}

fn array(v: Value) -> Result<Vec<Value>, BackplaneError> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        _ => Err(bad("not an array")),
    }
}

/// The batch script's replies, one per command.
pub(crate) fn batch_replies(v: Value, n: usize) -> Result<Vec<RoomReply>, BackplaneError> {
    let replies = array(v)?;
    if replies.len() != n {
        return Err(bad("a reply per command"));
    }
    replies
        .into_iter()
        .map(|r| {
            let mut r = array(r)?.into_iter();
            let kind = bytes(r.next().ok_or_else(|| bad("an empty reply"))?)?;
            let rest: Vec<Value> = r.collect();
            match kind.as_slice() {
                b"A" if rest.len() == 4 => Ok(RoomReply::Appended {
                    epoch: int(&rest[0])?,
                    offset: int(&rest[1])?,
                    members: usize::try_from(int(&rest[2])?).unwrap_or(usize::MAX),
                    again: int(&rest[3])? == 1,
                }),
                b"J" if rest.len() >= 2 => {
                    let epoch = int(&rest[0])?;
                    let at = int(&rest[1])?;
                    let members = rest
                        .into_iter()
                        .skip(2)
                        .map(bytes)
                        .collect::<Result<_, _>>()?;
                    Ok(RoomReply::Joined { epoch, at, members })
                }
                b"F" => Ok(RoomReply::Full),
                b"L" if rest.len() == 1 => Ok(RoomReply::Left {
                    removed: int(&rest[0])? == 1,
                }),
                _ => Err(bad("an unknown reply")),
            }
        })
        .collect()
}

/// The read script's reply.
pub(crate) fn read_reply(v: Value) -> Result<RoomLog, BackplaneError> {
    let mut it = array(v)?.into_iter();
    let epoch = int(&it.next().ok_or_else(|| bad("no epoch"))?)?;
    let last = int(&it.next().ok_or_else(|| bad("no top"))?)?;
    let mut entries = Vec::new();
    for e in it {
        // [id, [field, value]]
        let mut e = array(e)?.into_iter();
        let id = bytes(e.next().ok_or_else(|| bad("an entry without id"))?)?;
        let offset = std::str::from_utf8(&id)
            .ok()
            .and_then(|id| id.split('-').next())
            .and_then(|ms| ms.parse::<u64>().ok())
            .ok_or_else(|| bad("an entry id"))?;
        let mut fields = array(e.next().ok_or_else(|| bad("an entry without fields"))?)?;
        if fields.len() < 2 {
            return Err(bad("an entry without its field"));
        }
        let value = bytes(fields.swap_remove(1))?;
        entries.push((offset, value));
    }
    Ok(RoomLog {
        epoch,
        last,
        entries,
    })
}

/// The sweep script's reply.
pub(crate) fn sweep_reply(v: Value) -> Result<Swept, BackplaneError> {
    let a = array(v)?;
    if a.len() != 2 {
        return Err(bad("a sweep reply"));
    }
    Ok(Swept {
        removed: usize::try_from(int(&a[0])?).unwrap_or(usize::MAX),
        remaining: usize::try_from(int(&a[1])?).unwrap_or(usize::MAX),
    })
}

/// A members hash (HGETALL) as members.
pub(crate) fn members_reply(v: Value) -> Result<Vec<RoomMember>, BackplaneError> {
    let flat: Vec<Vec<u8>> = match v {
        Value::Map(pairs) => {
            let mut flat = Vec::with_capacity(pairs.len() * 2);
            for (k, v) in pairs {
                flat.push(bytes(k)?);
                flat.push(bytes(v)?);
            }
            flat
        }
        v => array(v)?.into_iter().map(bytes).collect::<Result<_, _>>()?,
    };
    let mut members = Vec::with_capacity(flat.len() / 2);
    for pair in flat.chunks_exact(2) {
        let session = String::from_utf8_lossy(&pair[0]).into_owned();
        let Some(nl) = pair[1].iter().position(|&b| b == b'\n') else {
            continue;
        };
        members.push(RoomMember {
            session,
            node: String::from_utf8_lossy(&pair[1][..nl]).into_owned(),
            member: pair[1][nl + 1..].to_vec(),
        });
    }
    Ok(members)
}

/// A published entry, `{epoch}:{offset}:{entry}`.
pub(crate) fn parse_published(payload: &[u8]) -> Option<(u64, u64, Vec<u8>)> {
    let first = payload.iter().position(|&b| b == b':')?;
    let rest = &payload[first + 1..];
    let second = rest.iter().position(|&b| b == b':')?;
    let epoch = std::str::from_utf8(&payload[..first]).ok()?.parse().ok()?;
    let offset = std::str::from_utf8(&rest[..second]).ok()?.parse().ok()?;
    Some((epoch, offset, rest[second + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_entry_reads_back() {
        assert_eq!(
            parse_published(b"17:4:Mx:y"),
            Some((17, 4, b"Mx:y".to_vec()))
        );
        assert_eq!(parse_published(b"17:4"), None);
        assert_eq!(parse_published(b"x:4:M"), None);
    }
}
