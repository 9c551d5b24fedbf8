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
"use strict";

const http = require("http");
const readline = require("readline");
const { Server } = require("socket.io");

const ROOM = "fanout";

const httpServer = http.createServer();
const io = new Server(httpServer, { transports: ["websocket"], serveClient: false });

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

// The same accept queue as every other server in the benchmark.
httpServer.listen({ port: 0, host: "0.0.0.0", backlog: 4096 }, () => {
  process.stdout.write(`port ${httpServer.address().port}\n`);
});

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
