// Sends N notifications at once over one connection with token auth, as node-apn's users
// do, and prints what node-apn reports as JSON.
// Usage: node send.js PORT N CA_FILE P8_FILE KEY_ID TEAM_ID TOPIC [MAX_SESSION_MEMORY_MB]
const http2 = require('http2');
const fs = require('fs');
const [, , port, n, caFile, p8, keyId, teamId, topic, memory] = process.argv;
if (memory) {
  // node's own limit on one HTTP/2 session's buffers (10 MB by default).
  const connect = http2.connect;
  http2.connect = (a, o, l) => connect(a, Object.assign({}, o, { maxSessionMemory: Number(memory) }), l);
}
const apn = require('@parse/node-apn');
const provider = new apn.Provider({
  token: { key: fs.readFileSync(p8), keyId, teamId },
  address: '127.0.0.1', port: Number(port), ca: fs.readFileSync(caFile), production: false,
  // A debug build of the emulator on a busy CI machine is slower than Apple.
  requestTimeout: 60000,
});
const note = new apn.Notification({ alert: 'hello', topic });
const tokens = Array.from({ length: Number(n) }, (_, i) => i.toString(16).padStart(64, '0'));
provider.send(note, tokens).then((r) => {
  const reasons = {};
  for (const f of r.failed) {
    const k = f.response ? f.response.reason : String(f.error && f.error.message);
    reasons[k] = (reasons[k] || 0) + 1;
  }
  console.log(JSON.stringify({ sent: r.sent.length, failed: r.failed.length, reasons }));
  provider.shutdown();
});
