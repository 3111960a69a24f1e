// A front end written the way the backend's WebSocket guide describes, run by
// Node's browser-compatible WebSocket: connect, send the auth frame on open,
// then switch on each message's type. Prints one line per event it handled
// and exits once it has seen `want` chat events.
//
// usage: node --experimental-websocket guide_client.mjs URL TOKEN WANT

const [url, token, want] = process.argv.slice(2);
const seen = [];
const ws = new WebSocket(url);

ws.onopen = () => {
  ws.send(JSON.stringify({ type: "auth", token }));
};

ws.onmessage = (event) => {
  const message = JSON.parse(event.data);
  switch (message.type) {
    case "auth_success":
      console.log("authenticated");
      break;
    case "auth_error":
      console.log(`auth_error: ${message.message}`);
      ws.close();
      break;
    case "new_message":
      seen.push(`new_message ${message.payload.chatId} ${message.payload.role}`);
      break;
    case "new_chat":
      seen.push(`new_chat ${message.payload.id} ${message.payload.userId}`);
      break;
    default:
      console.log(`unexpected: ${message.type}`);
  }
  if (seen.length >= Number(want)) {
    for (const line of seen) console.log(line);
    ws.close();
  }
};

ws.onclose = (event) => {
  console.log(`closed ${event.code}`);
  process.exit(0);
};

ws.onerror = () => {
  console.log("error");
  process.exit(1);
};
