// The Node.js socket.io server of the benchmark's "peers" scenarios
// (bench/src/peers/), run by `kitestring-bench inner server socketio-node`.
//
// The same work as every other server there: each connection joins the room
// its connect packet's auth payload names ({"join":"fanout"}), every "echo"
// event goes back to its sender, and `broadcast N` on stdin sends N
// 32-character payloads to the room, each numbered by this process. Lines on stdin, one answer each:
//   count        -> "count <connections opened> <joins>" (totals since start)
//   broadcast N  -> "sent" once the N emits are done
// The process exits when stdin ends. WebSocket transport only; every other
// setting is socket.io's default.
//
// With a Redis URL as its argument (`node server.js redis://...`), the
// process is one node of a cluster: socket.io's Redis streams adapter
// (@socket.io/redis-streams-adapter, on the `redis` package) carries every
// broadcast to the other nodes' members, as the cluster benchmark
// (bench/src/cluster.rs) measures.
"use strict";

const http = require("http");
const readline = require("readline");
const { Server } = require("socket.io");

const ROOM = "fanout";

const httpServer = http.createServer();
const io = new Server(httpServer, { transports: ["websocket"], serveClient: false });
const redisUrl = process.argv[2];

let connections = 0;
let joined = 0;
let seq = 0;

io.on("connection", (socket) => {
  connections++;
  socket.on("echo", (data) => {
    socket.emit("echo", data);
  });
  const room = socket.handshake.auth.join;
  if (typeof room === "string") {
    socket.join(room);
    joined++;
  }
});

// Sequence number in 16 hex digits, padded to 32 characters.
const PAD = "................";
function payload(n) {
  return n.toString(16).padStart(16, "0") + PAD;
}

// The same accept queue as every other server in the benchmark; a node of
// a cluster listens once its adapter is in place.
function listen() {
  httpServer.listen({ port: 0, host: "0.0.0.0", backlog: 4096 }, () => {
    process.stdout.write(`port ${httpServer.address().port}\n`);
  });
}

if (redisUrl) {
  const { createClient } = require("redis");
  const { createAdapter } = require("@socket.io/redis-streams-adapter");
  const client = createClient({ url: redisUrl });
  client.on("error", (e) => process.stderr.write(`redis: ${e}\n`));
  client.connect().then(
    () => {
      io.adapter(createAdapter(client));
      listen();
    },
    (e) => {
      process.stderr.write(`redis: ${e}\n`);
      process.exit(1);
    },
  );
} else {
  listen();
}

const lines = readline.createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const words = line.trim().split(/\s+/);
  switch (words[0]) {
    case "count":
      process.stdout.write(`count ${connections} ${joined}\n`);
      break;
    case "broadcast": {
      const n = parseInt(words[1] || "0", 10);
      for (let i = 0; i < n; i++) {
        seq++;
        io.to(ROOM).emit("fanout", payload(seq));
      }
      process.stdout.write("sent\n");
      break;
    }
    default:
      process.stdout.write("?\n");
  }
});
lines.on("close", () => process.exit(0));
