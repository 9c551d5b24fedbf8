//! The hand-written JSON reader and writer: envelopes, handshakes and
//! payload checks without serde.
//!
//! Owns the fast path of every text message and every JSON payload check:
//! a pull reader over JSON text ([`JsonReader`]), the envelope and
//! handshake readers built on it, the check that bytes are exactly one JSON
//! value, and the string escaping every JSON writer of the core uses. What
//! the readers accept, serde reads to the same envelope: on anything
//! unusual (an envelope written as an array, an escaped key, a number
//! serde would read as a float or refuse, nesting deeper than 64 levels)
//! they give up, and serde reads the text (feature `json-serde`, on by
//! default; without it, as in the browser package, the message is refused).
//! The payload check accepts exactly what serde_json accepts as one value.
//! The fuzz targets check both on every input. It must never panic,
//! recurse deeper than a batch's one level (nested values are skipped
//! without recursion, at most [`MAX_JSON_DEPTH`] deep) or allocate more
//! than the text it reads.

use std::borrow::Cow;

use super::envelope::{HandshakeEnvelope, JsonEnvelope, RawJson};
use super::{MAX_BATCH, MAX_JSON_DEPTH};

/// A pull reader over JSON text, as serde_json reads it: whitespace is
/// `' '`, `'\n'`, `'\t'` and `'\r'`; strings hold no control characters;
/// numbers have no leading zeros. Every method returns `None` on anything
/// it does not take (the reader's [`position`](Self::position) is then
/// near the fault) and never panics.
///
/// Built for reading small documents of a known shape (the core's
/// envelopes, a driver's options) without serde: read an object's entries
/// with [`object`](Self::object), values with [`str`](Self::str),
/// [`uint`](Self::uint), [`number`](Self::number), [`bool`](Self::bool),
/// [`null`](Self::null), and skip any value with [`skip`](Self::skip).
#[derive(Clone, Debug)]
pub struct JsonReader<'a> {
    /// The document, already valid UTF-8: a string or a value between
    /// ASCII delimiters is sliced from it without being checked again.
    src: &'a str,
    text: &'a [u8],
    at: usize,
}

impl<'a> JsonReader<'a> {
    /// A reader at the start of `text`.
    pub fn new(text: &'a str) -> Self {
        JsonReader {
            src: text,
            text: text.as_bytes(),
            at: 0,
        }
    }

    /// The byte offset the reader has reached.
    pub fn position(&self) -> usize {
        self.at
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.text.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte that is not whitespace, not consumed.
    pub fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.text.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.at += 1)
    }

    /// Whether only whitespace is left.
    pub fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }

    /// Consumes a `null` if one is next, and says whether it did.
    pub fn null(&mut self) -> bool {
        self.peek() == Some(b'n') && self.ident(b"null").is_some()
    }

    fn ident(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at.checked_add(word.len())?;
        (self.text.get(self.at..end)? == word).then(|| self.at = end)
    }

    /// A `true` or `false`.
    pub fn bool(&mut self) -> Option<bool> {
        match self.peek()? {
            b't' => self.ident(b"true").map(|()| true),
            b'f' => self.ident(b"false").map(|()| false),
            _ => None,
        }
    }

    /// A non-negative integer that fits a `u64`, written without a
    /// fraction or an exponent (serde reads those as floats).
    pub fn uint(&mut self) -> Option<u64> {
        self.ws();
        let start = self.at;
        let mut v: u64 = 0;
        while let Some(&d @ b'0'..=b'9') = self.text.get(self.at) {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        let leading_zero = digits > 1 && self.text[start] == b'0';
        if digits == 0 || leading_zero || matches!(self.text.get(self.at), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        Some(v)
    }

    /// Any JSON number, as an `f64`: exact for integers below 2^53 and
    /// within a few units in the last place otherwise (the first 19
    /// significant digits scaled by a power of ten), which is what a
    /// setting needs; `None` beyond `f64`'s range. Not correctly rounded
    /// like `str::parse`, whose tables would weigh more in the browser
    /// package than all of this reader.
    pub fn number(&mut self) -> Option<f64> {
        self.ws();
        let start = self.at;
        self.skip_number()?;
        let text = &self.text[start..self.at];
        let (negative, text) = match text.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, text),
        };
        let mut digits: u64 = 0;
        // The power of ten the digits are scaled by.
        let mut scale: i32 = 0;
        let mut fraction = false;
        let mut rest = text.iter();
        for &b in rest.by_ref() {
            match b {
                b'.' => fraction = true,
                b'0'..=b'9' => {
                    if digits < 1_000_000_000_000_000_000 {
                        digits = digits * 10 + u64::from(b - b'0');
                        scale -= i32::from(fraction);
                    } else {
                        // Beyond 19 digits: only the magnitude counts.
                        scale += i32::from(!fraction);
                    }
                }
                _ => break,
            }
        }
        // The exponent, after `e` (its digits checked by `skip_number`).
        let mut exp: i32 = 0;
        let mut exp_negative = false;
        for &b in rest {
            match b {
                b'-' => exp_negative = true,
                b'0'..=b'9' => exp = exp.saturating_mul(10).saturating_add(i32::from(b - b'0')),
                _ => {}
            }
        }
        let exp = scale.saturating_add(if exp_negative { -exp } else { exp });
        let magnitude = if exp < 0 {
            // Dividing by an exact power of ten rounds once, up to 10^22.
            digits as f64 / 10f64.powi(-exp)
        } else {
            digits as f64 * 10f64.powi(exp)
        };
        let v = if negative { -magnitude } else { magnitude };
        v.is_finite().then_some(v)
    }

    /// A string. Borrowed from the text unless it has escapes; a lone
    /// UTF-16 surrogate in a `\u` escape is refused, as serde refuses it in
    /// a string.
    pub fn str(&mut self) -> Option<Cow<'a, str>> {
        self.eat(b'"')?;
        let start = self.at;
        let (end, escaped) = self.string_end()?;
        let raw = &self.text[start..end];
        self.at = end + 1;
        if !escaped {
            // Between two quotes: on character boundaries of `src`.
            return self.src.get(start..end).map(Cow::Borrowed);
        }
        unescape(raw).map(Cow::Owned)
    }

    /// A string without escapes, as its bytes: an object's key.
    fn key(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.at;
        let (end, escaped) = self.string_end()?;
        let raw = &self.text[start..end];
        self.at = end + 1;
        (!escaped).then_some(raw)
    }

    /// The index of the closing quote of the string whose body starts at
    /// the reader's position, and whether the body has escapes, checked as
    /// serde checks them. The bytes between escapes are passed over in one
    /// scan for the next quote, backslash or control character.
    fn string_end(&self) -> Option<(usize, bool)> {
        let text = self.text;
        let mut i = self.at;
        let mut escaped = false;
        loop {
            i += text
                .get(i..)?
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
            match text[i] {
                b'"' => return Some((i, escaped)),
                b'\\' => {
                    escaped = true;
                    i += 1;
                    match *text.get(i)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 1,
                        b'u' => {
                            let hex = text.get(i + 1..i + 5)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            i += 5;
                        }
                        _ => return None,
                    }
                }
                _ => return None, // a control character
            }
        }
    }

    fn skip_number(&mut self) -> Option<()> {
        let digit = |r: &Self| matches!(r.text.get(r.at), Some(b'0'..=b'9'));
        let digits = |r: &mut Self| {
            let start = r.at;
            while digit(r) {
                r.at += 1;
            }
            (r.at > start).then_some(())
        };
        if self.text.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        match self.text.get(self.at)? {
            b'0' => {
                self.at += 1;
                if digit(self) {
                    return None;
                }
            }
            b'1'..=b'9' => digits(self)?,
            _ => return None,
        }
        if self.text.get(self.at) == Some(&b'.') {
            self.at += 1;
            digits(self)?;
        }
        if let Some(b'e' | b'E') = self.text.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.text.get(self.at) {
                self.at += 1;
            }
            digits(self)?;
        }
        Some(())
    }

    /// Skips one value of any type, checked as serde_json checks a value
    /// it ignores. Arrays and objects nested deeper than
    /// [`MAX_JSON_DEPTH`] are not taken.
    pub fn skip(&mut self) -> Option<()> {
        // One bit a level: set for an object.
        let mut objects: u64 = 0;
        let mut depth = 0usize;
        loop {
            // A value.
            match self.peek()? {
                b'n' => self.ident(b"null")?,
                b't' => self.ident(b"true")?,
                b'f' => self.ident(b"false")?,
                b'"' => {
                    self.at += 1;
                    self.at = self.string_end()?.0 + 1;
                }
                b'-' | b'0'..=b'9' => self.skip_number()?,
                open @ (b'[' | b'{') => {
                    self.at += 1;
                    if depth == MAX_JSON_DEPTH {
                        return None;
                    }
                    let object = open == b'{';
                    objects = (objects << 1) | u64::from(object);
                    depth += 1;
                    let close = if object { b'}' } else { b']' };
                    if self.peek()? == close {
                        self.at += 1;
                        depth -= 1;
                        objects >>= 1;
                    } else {
                        if object {
                            self.key_colon()?;
                        }
                        continue;
                    }
                }
                _ => return None,
            }
            // After a value: the next entry, or the end of containers.
            loop {
                if depth == 0 {
                    return Some(());
                }
                let object = objects & 1 == 1;
                match self.peek()? {
                    b',' => {
                        self.at += 1;
                        if object {
                            self.key_colon()?;
                        }
                        break;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return None,
                }
                self.at += 1;
                depth -= 1;
                objects >>= 1;
            }
        }
    }

    /// An object's key with any escapes, and its colon.
    fn key_colon(&mut self) -> Option<()> {
        self.eat(b'"')?;
        self.at = self.string_end()?.0 + 1;
        self.eat(b':')
    }

    /// One value of any type, as its text.
    pub fn raw(&mut self) -> Option<&'a str> {
        self.ws();
        let start = self.at;
        self.skip()?;
        self.src.get(start..self.at)
    }

    /// Reads an object, calling `entry` with each key (the reader then at
    /// its value, which `entry` must read). Keys with escapes are not
    /// taken.
    pub fn object(
        &mut self,
        mut entry: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        self.object_dyn(&mut entry)
    }

    /// [`object`](Self::object), one copy for every shape: only the
    /// entries' code differs between them.
    #[inline(never)]
    fn object_dyn(
        &mut self,
        entry: &mut dyn FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            let key = self.key()?;
            self.eat(b':')?;
            entry(self, key)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Reads an array, calling `item` with the reader at each value (which
    /// `item` must read).
    pub fn array(&mut self, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.array_dyn(&mut item)
    }

    /// [`array`](Self::array), one copy for every shape.
    #[inline(never)]
    fn array_dyn(&mut self, item: &mut dyn FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        if self.peek()? == b']' {
            self.at += 1;
            return Some(());
        }
        loop {
            item(self)?;
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `null` as `None`, anything else read by `read`.
    pub fn opt<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.null() {
            return Some(None);
        }
        read(self).map(Some)
    }
}

/// The text of a string's body with escapes, unescaped; `None` for a lone
/// surrogate. The escapes were checked by `string_end`.
fn unescape(raw: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let hex = |at: usize| -> Option<u32> {
        let digits = std::str::from_utf8(raw.get(at..at + 4)?).ok()?;
        u32::from_str_radix(digits, 16).ok()
    };
    while let Some(&b) = raw.get(i) {
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let c = match *raw.get(i + 1)? {
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let n = hex(i + 2)?;
                i += 6;
                let c = if (0xD800..0xDC00).contains(&n) {
                    // A leading surrogate: a trailing one must follow.
                    if raw.get(i..i + 2)? != b"\\u" {
                        return None;
                    }
                    let n2 = hex(i + 2)?;
                    if !(0xDC00..0xE000).contains(&n2) {
                        return None;
                    }
                    i += 6;
                    char::from_u32(0x10000 + ((n - 0xD800) << 10) + (n2 - 0xDC00))?
                } else {
                    char::from_u32(n)?
                };
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            other => char::from(other),
        };
        out.push(c as u8);
        i += 2;
    }
    String::from_utf8(out).ok()
}

/// Where the one JSON value in `data` starts and ends, whitespace around
/// it allowed: exactly what serde_json reads as a `&RawValue` from these
/// bytes (UTF-8 throughout), given nesting within [`MAX_JSON_DEPTH`]
/// (deeper values are refused by the depth scan first). `Err`: the byte
/// offset of the fault.
pub(super) fn json_value(data: &[u8]) -> Result<(usize, usize), usize> {
    let text = std::str::from_utf8(data).map_err(|e| e.valid_up_to())?;
    let mut rd = JsonReader::new(text);
    rd.ws();
    let start = rd.at;
    rd.skip().ok_or(rd.at)?;
    let end = rd.at;
    if !rd.at_end() {
        return Err(rd.at);
    }
    Ok((start, end))
}

/// The `t` of the JSON envelope in `text`, if its text starts like an
/// envelope Kitestring writes: the first `t` among the object's entries,
/// the rest skipped.
pub(super) fn quick_json_type<'a>(rd: &mut JsonReader<'a>) -> Option<Cow<'a, str>> {
    rd.eat(b'{')?;
    loop {
        let key = rd.key()?;
        rd.eat(b':')?;
        if key == b"t" {
            return rd.str();
        }
        rd.skip()?;
        rd.eat(b',')?;
    }
}

/// Each field of an envelope once: serde refuses a duplicate, even of a
/// field that was `null`. One bit a field: bits 0 to 30 are taken, so the
/// next field takes the last one, and the one after needs a wider set.
struct Seen(u32);

/// Reads a field's value into its slot, refusing a second one.
macro_rules! once {
    ($seen:ident, $bit:expr, $slot:expr => $value:expr) => {{
        $seen.first($bit)?;
        $slot = $value;
    }};
}

impl Seen {
    fn first(&mut self, bit: u32) -> Option<()> {
        let mask = 1 << bit;
        if self.0 & mask != 0 {
            return None;
        }
        self.0 |= mask;
        Some(())
    }
}

/// Reads a JSON envelope (not a handshake) the way serde reads it into
/// [`JsonEnvelope`], for the forms any ordinary JSON writer produces: one
/// object, plain keys, each field once, integers as integers, a batch's
/// `f` an array of at most [`MAX_BATCH`] such objects (none with an `f`
/// of its own), unknown keys skipped, whitespace anywhere. `None` as soon
/// as anything else turns up, with `env` partly filled: serde then reads
/// the text and decides (or, without the `json-serde` feature, the message
/// is refused).
pub(super) fn quick_json_envelope<'a>(
    rd: &mut JsonReader<'a>,
    env: &mut JsonEnvelope<'a>,
) -> Option<()> {
    envelope(rd, env, false)?;
    rd.at_end().then_some(())
}

fn envelope<'a>(rd: &mut JsonReader<'a>, env: &mut JsonEnvelope<'a>, nested: bool) -> Option<()> {
    let mut seen = Seen(0);
    let uint = |rd: &mut JsonReader<'a>| rd.opt(JsonReader::uint);
    let str = |rd: &mut JsonReader<'a>| rd.opt(JsonReader::str);
    rd.object(|rd, key| {
        match key {
            b"t" => {
                seen.first(0)?;
                env.t = rd.str()?;
            }
            b"seq" => once!(seen, 1, env.seq => uint(rd)?),
            b"id" => once!(seen, 2, env.id => uint(rd)?),
            b"ack" => once!(seen, 3, env.ack => uint(rd)?),
            b"ts" => once!(seen, 4, env.ts => uint(rd)?),
            // `"j":null` is a payload of null.
            b"j" => once!(seen, 5, env.j => Some(RawJson(rd.raw()?))),
            b"m" => once!(seen, 6, env.m => str(rd)?),
            b"b" => once!(seen, 7, env.b => str(rd)?),
            b"nonce" => once!(seen, 8, env.nonce => uint(rd)?),
            b"from" => once!(seen, 9, env.from => uint(rd)?),
            b"code" => {
                seen.first(10)?;
                env.code = rd.opt(|rd| u16::try_from(rd.uint()?).ok())?;
            }
            b"retry" => once!(seen, 11, env.retry => uint(rd)?),
            b"r" => once!(seen, 12, env.r => str(rd)?),
            b"op" => once!(seen, 13, env.op => str(rd)?),
            b"rq" => once!(seen, 14, env.rq => rd.opt(JsonReader::bool)?),
            b"rs" => once!(seen, 15, env.rs => uint(rd)?),
            b"within" => once!(seen, 16, env.within => uint(rd)?),
            b"token" => once!(seen, 17, env.token => str(rd)?),
            // Not `null`: serde reads `f` as an array only.
            b"f" if !nested => {
                seen.first(18)?;
                // Grown as the envelopes arrive: nothing is reserved on
                // the word of the text.
                let mut inner = Vec::new();
                rd.array(|rd| {
                    if inner.len() == MAX_BATCH {
                        return None;
                    }
                    let mut one = JsonEnvelope::default();
                    envelope(rd, &mut one, true)?;
                    inner.push(one);
                    Some(())
                })?;
                env.f = Some(inner);
            }
            b"f" => return None,
            b"dj" => once!(seen, 19, env.dj => uint(rd)?),
            b"dm" => once!(seen, 20, env.dm => uint(rd)?),
            b"db" => once!(seen, 21, env.db => uint(rd)?),
            b"e" => once!(seen, 22, env.e => uint(rd)?),
            b"k" => once!(seen, 27, env.k => str(rd)?),
            b"n" => once!(seen, 28, env.n => str(rd)?),
            b"hl" => once!(seen, 29, env.hl => uint(rd)?),
            b"hn" => once!(seen, 30, env.hn => uint(rd)?),
            #[cfg(feature = "compression")]
            b"z" => once!(seen, 23, env.z => uint(rd)?),
            #[cfg(feature = "compression")]
            b"zj" => once!(seen, 24, env.zj => str(rd)?),
            #[cfg(feature = "compression")]
            b"zm" => once!(seen, 25, env.zm => str(rd)?),
            #[cfg(feature = "compression")]
            b"zb" => once!(seen, 26, env.zb => str(rd)?),
            _ => rd.skip()?,
        }
        Some(())
    })?;
    (seen.0 & 1 == 1).then_some(())
}

/// Reads a handshake envelope (`hello`, `welcome`, `reject`) as serde reads
/// it into [`HandshakeEnvelope`], on the terms of [`quick_json_envelope`].
pub(super) fn quick_json_handshake<'a>(
    rd: &mut JsonReader<'a>,
    env: &mut HandshakeEnvelope<'a>,
) -> Option<()> {
    let mut seen = Seen(0);
    let uint = |rd: &mut JsonReader<'a>| rd.opt(JsonReader::uint);
    let str = |rd: &mut JsonReader<'a>| rd.opt(JsonReader::str);
    let strs = |rd: &mut JsonReader<'a>| {
        rd.opt(|rd| {
            let mut list = Vec::new();
            rd.array(|rd| {
                let s = rd.str()?;
                if list.is_empty() {
                    // A hello's `caps` has up to eight names: one allocation.
                    list.reserve(8);
                }
                list.push(s);
                Some(())
            })?;
            Some(list)
        })
    };
    let u8 = |rd: &mut JsonReader<'a>| u8::try_from(rd.uint()?).ok();
    rd.object(|rd, key| {
        match key {
            b"t" => {
                seen.first(0)?;
                env.t = rd.str()?;
            }
            b"versions" => {
                seen.first(1)?;
                env.versions = rd.opt(|rd| {
                    let mut list = Vec::new();
                    rd.array(|rd| u8(rd).map(|v| list.push(v)))?;
                    Some(list)
                })?;
            }
            b"client" => once!(seen, 2, env.client => str(rd)?),
            b"session" => once!(seen, 3, env.session => str(rd)?),
            b"delivered" => once!(seen, 4, env.delivered => uint(rd)?),
            b"caps" => once!(seen, 5, env.caps => strs(rd)?),
            b"codecs" => once!(seen, 6, env.codecs => strs(rd)?),
            b"version" => once!(seen, 7, env.version => rd.opt(u8)?),
            b"codec" => once!(seen, 8, env.codec => str(rd)?),
            b"resumed" => once!(seen, 9, env.resumed => rd.opt(JsonReader::bool)?),
            b"lost" => once!(seen, 10, env.lost => str(rd)?),
            b"features" => once!(seen, 11, env.features => strs(rd)?),
            b"ping_ms" => once!(seen, 12, env.ping_ms => uint(rd)?),
            b"pong_ms" => once!(seen, 13, env.pong_ms => uint(rd)?),
            b"max" => once!(seen, 14, env.max => uint(rd)?),
            b"code" => {
                seen.first(15)?;
                env.code = rd.opt(|rd| u16::try_from(rd.uint()?).ok())?;
            }
            b"reason" => once!(seen, 16, env.reason => str(rd)?),
            b"message" => once!(seen, 17, env.message => str(rd)?),
            b"retry" => once!(seen, 18, env.retry => uint(rd)?),
            b"key" => once!(seen, 19, env.key => str(rd)?),
            b"acked" => once!(seen, 20, env.acked => uint(rd)?),
            b"recovered" => once!(seen, 21, env.recovered => rd.opt(JsonReader::bool)?),
            b"join" => once!(seen, 22, env.join => strs(rd)?),
            _ => rd.skip()?,
        }
        Some(())
    })?;
    (seen.0 & 1 == 1 && rd.at_end()).then_some(())
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it: `"`,
/// `\` and control characters only, the common ones by their short
/// escapes, the others as `\u00XX`.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    // Most strings (ids, names, capabilities) need no escape: one check
    // without early exit (which vectorizes), then one copy.
    if bytes.iter().fold(true, |clean, &b| {
        clean & (b >= 0x20) & (b != b'"') & (b != b'\\')
    }) {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0..=0x1f => b'u',
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(&[b'\\', short]);
        if short == b'u' {
            out.extend_from_slice(&[
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends `v` in decimal.
pub(crate) fn push_uint(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Panics if the hand-written JSON readers take `text` and serde reads it
/// differently or refuses it: the envelope (or handshake) reader, and the
/// check that bytes are one JSON value (on `text` itself). Returns whether
/// the envelope reader took it.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn assert_quick_json_agrees(text: &str) -> bool {
    use super::payload::json_depth_ok;
    use serde_json::value::RawValue;

    // One JSON value: exactly when serde reads one, at the same place.
    if json_depth_ok(text.as_bytes()) {
        let ours = json_value(text.as_bytes()).ok();
        let theirs = serde_json::from_str::<&RawValue>(text).ok().map(|raw| {
            let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
            (start, start + raw.get().len())
        });
        assert_eq!(ours, theirs, "the JSON value check and serde disagree");
    }
    // The text as a payload's base64: the same bytes as the crate's, or
    // refused by both.
    {
        use base64::Engine as _;
        let theirs = base64::engine::general_purpose::STANDARD.decode(text).ok();
        assert_eq!(
            crate::base64::decode(text.as_bytes()),
            theirs,
            "base64 and the crate disagree"
        );
    }
    let Some(t) = quick_json_type(&mut JsonReader::new(text)) else {
        return false;
    };
    let mut rd = JsonReader::new(text);
    if matches!(&*t, "hello" | "welcome" | "reject") {
        let mut quick = HandshakeEnvelope::default();
        if quick_json_handshake(&mut rd, &mut quick).is_none() {
            return false;
        }
        let by_serde: HandshakeEnvelope<'_> = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("the quick reader took a handshake serde refuses: {e}"));
        assert_eq!(
            serde_json::to_string(&quick).ok(),
            serde_json::to_string(&by_serde).ok(),
            "the quick reader and serde read different handshakes"
        );
        return true;
    }
    let mut quick = JsonEnvelope::default();
    if quick_json_envelope(&mut rd, &mut quick).is_none() {
        return false;
    }
    let by_serde: JsonEnvelope<'_> = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("the quick reader took an envelope serde refuses: {e}"));
    // Equal envelopes serialize to the same text, and different ones not.
    assert_eq!(
        serde_json::to_string(&quick).ok(),
        serde_json::to_string(&by_serde).ok(),
        "the quick reader and serde read different envelopes"
    );
    true
}
