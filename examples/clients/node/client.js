#!/usr/bin/env node
// A Tokenwire client in Node.js over TLS with an API key:
//   1. one streamed Converse turn, printing its deltas as they come;
//   2. a second turn on the same stream, cancelled with CancelTurn mid-answer;
//   3. the caller's conversations.
// Every line on stdout is "name: value" (delta text JSON-quoted), so a script can
// check it; errors go to stderr and the exit status is non-zero.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const USAGE = `usage: node client.js [options]
  --address HOST:PORT  the server (env TOKENWIRE_ADDRESS, default 127.0.0.1:50051)
  --ca FILE            PEM CA bundle that signed the server's certificate
                       (env TOKENWIRE_CA_FILE; default: the system's roots)
  --api-key KEY        API key sent as "authorization: Bearer KEY" (env TOKENWIRE_API_KEY)
  --message TEXT       the first turn's message (default "Hello!")
  --protos DIR         the folder holding tokenwire/v1/*.proto (default: the repository's)
  --timeout-s N        give up after N seconds (default 60)`;

function options() {
  const { values } = parseArgs({
    options: {
      address: { type: "string", default: process.env.TOKENWIRE_ADDRESS || "127.0.0.1:50051" },
      ca: { type: "string", default: process.env.TOKENWIRE_CA_FILE || "" },
      "api-key": { type: "string", default: process.env.TOKENWIRE_API_KEY || "" },
      message: { type: "string", default: "Hello!" },
      protos: { type: "string", default: path.join(__dirname, "..", "..", "..", "protos") },
      "timeout-s": { type: "string", default: "60" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (!values["api-key"]) {
    throw new Error("an API key is required: --api-key or TOKENWIRE_API_KEY");
  }
  return values;
}

// Loaded at run time from the .proto files: nothing generated to build or keep fresh.
function loadApi(protosDir) {
  const files = ["tokenwire/v1/chat.proto", "tokenwire/v1/conversations.proto"];
  const definition = protoLoader.loadSync(files, {
    includeDirs: [protosDir],
    keepCase: true, // field names exactly as in the .proto files
    enums: String, // enum values by name: "FINISH_REASON_STOP"
    longs: String,
    defaults: true,
    oneofs: true, // each oneof's set field is named by its oneof: event.event === "delta"
  });
  return grpc.loadPackageDefinition(definition).tokenwire.v1;
}

function credentials(caFile, apiKey) {
  const channel = grpc.credentials.createSsl(caFile ? fs.readFileSync(caFile) : null);
  // Call credentials: the key goes with every call, and only ever over TLS.
  const key = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
    const metadata = new grpc.Metadata();
    metadata.set("authorization", `Bearer ${apiKey}`);
    callback(null, metadata);
  });
  return grpc.credentials.combineChannelCredentials(channel, key);
}

function reason(finished) {
  return String(finished.finish_reason).replace(/^FINISH_REASON_/, "");
}

// Reads a Converse stream's events one at a time, in order.
class Events {
  constructor(call) {
    this.queue = [];
    this.waiting = null;
    this.ended = false;
    this.error = null;
    call.on("data", (event) => this.push(event));
    call.on("end", () => {
      this.ended = true;
      this.push(null);
    });
    call.on("error", (error) => {
      this.error = error;
      this.push(null);
    });
  }

  push(event) {
    if (this.waiting) {
      const resolve = this.waiting;
      this.waiting = null;
      resolve(event);
    } else {
      this.queue.push(event);
    }
  }

  async next() {
    const event = this.queue.length ? this.queue.shift() : await new Promise((r) => (this.waiting = r));
    if (event === null) {
      throw this.error || new Error("the server ended the Converse stream");
    }
    if (event.event === "error") {
      const e = event.error;
      throw new Error(`turn refused: ${e.error_type} (code ${e.code}): ${e.message}`);
    }
    return event;
  }
}

async function converse(chat, opts, deadline) {
  const call = chat.Converse({ deadline });
  const events = new Events(call);

  // Turn 1: to its end, printing each delta as it arrives.
  call.write({ start: { message: opts.message, idempotency_key: "" } });
  let event = await events.next();
  const first = event.started;
  console.log(`conversation: ${first.conversation_id}`);
  console.log(`turn: ${first.turn_id}`);
  console.log(`model: ${first.model}`);
  for (event = await events.next(); event.event === "delta"; event = await events.next()) {
    console.log(`delta: ${JSON.stringify(event.delta.text)}`);
  }
  const usage = event.finished.usage;
  console.log(`finished: ${reason(event.finished)}`);
  console.log(`usage: prompt_tokens=${usage.prompt_tokens} completion_tokens=${usage.completion_tokens}`);

  // Turn 2, same conversation: cancelled once its first delta is here.
  call.write({ start: { conversation_id: first.conversation_id, message: "Tell me a long story." } });
  const second = (await events.next()).started;
  console.log(`turn: ${second.turn_id}`);
  let cancelSent = false;
  for (event = await events.next(); event.event === "delta"; event = await events.next()) {
    // Deltas already on the wire when the cancel lands are part of the answer too.
    console.log(`partial: ${JSON.stringify(event.delta.text)}`);
    if (!cancelSent) {
      call.write({ cancel: { turn_id: second.turn_id } });
      cancelSent = true;
    }
  }
  const cancelled = reason(event.finished);
  console.log(`cancelled: ${cancelled}`);
  if (cancelled !== "CANCELLED") {
    // STOP: the whole answer was out before the cancel arrived (a very fast model).
    throw new Error(`the cancelled turn finished with ${cancelled}, not CANCELLED`);
  }

  // Half-close: the server ends the stream with OK.
  call.end();
  await new Promise((resolve, reject) => {
    if (events.ended) return resolve();
    if (events.error) return reject(events.error);
    call.on("end", resolve);
    call.on("error", reject);
  });
}

function listConversations(conversations, deadline) {
  return new Promise((resolve, reject) => {
    conversations.ListConversations({ page_size: 100 }, { deadline }, (error, response) =>
      error ? reject(error) : resolve(response.conversations),
    );
  });
}

async function main() {
  const opts = options();
  const api = loadApi(opts.protos);
  const creds = credentials(opts.ca, opts["api-key"]);
  const chat = new api.ChatService(opts.address, creds);
  const conversations = new api.ConversationService(opts.address, creds);
  const deadline = Date.now() + Number(opts["timeout-s"]) * 1000;
  try {
    await converse(chat, opts, deadline);
    const listed = await listConversations(conversations, deadline);
    console.log(`conversations: ${listed.length}`);
    for (const conversation of listed) {
      console.log(`listed: ${conversation.id}`);
    }
  } finally {
    chat.close();
    conversations.close();
  }
}

main().catch((error) => {
  const code = error.code !== undefined ? ` (${grpc.status[error.code] || error.code})` : "";
  console.error(`error${code}: ${error.details || error.message}`);
  process.exit(1);
});
