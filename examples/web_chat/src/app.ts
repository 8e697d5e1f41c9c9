// The example chat page: sign in with an API key, list conversations, stream an
// answer, stop it. Every call goes through clients generated from protos/ (see
// scripts/build-web), over the Connect protocol, to the gateway's HTTP edge, which
// hands it to the same interceptors and turn policies as a native gRPC call.

import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { ChatService, FinishReason, type TurnFinished } from "./gen/tokenwire/v1/chat_pb.js";
import {
  ConversationService,
  type Conversation,
  type Message,
} from "./gen/tokenwire/v1/conversations_pb.js";
import { ModelService } from "./gen/tokenwire/v1/models_pb.js";

const KEY_STORAGE = "tokenwire.apiKey";
const MAX_TOKENS = 512;

function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (found === null) throw new Error(`the page has no #${id}`);
  return found as T;
}

const ui = {
  signIn: element<HTMLFormElement>("sign-in"),
  apiKey: element<HTMLInputElement>("api-key"),
  signInError: element<HTMLParagraphElement>("sign-in-error"),
  app: element<HTMLDivElement>("app"),
  newChat: element<HTMLButtonElement>("new-chat"),
  conversations: element<HTMLUListElement>("conversations"),
  signOut: element<HTMLButtonElement>("sign-out"),
  model: element<HTMLSpanElement>("model"),
  status: element<HTMLSpanElement>("status"),
  messages: element<HTMLOListElement>("messages"),
  composer: element<HTMLFormElement>("composer"),
  prompt: element<HTMLTextAreaElement>("prompt"),
  send: element<HTMLButtonElement>("send"),
  stop: element<HTMLButtonElement>("stop"),
};

let apiKey = localStorage.getItem(KEY_STORAGE) ?? "";
let conversationId = "";
let running: AbortController | null = null;

// Every call carries the key as a bearer token, exactly as a gRPC client's metadata.
const bearer: Interceptor = (next) => async (request) => {
  request.header.set("authorization", `Bearer ${apiKey}`);
  return await next(request);
};
const transport = createConnectTransport({
  baseUrl: new URL(".", location.href).href.replace(/\/$/, ""),
  useBinaryFormat: true,
  interceptors: [bearer],
});
const chat = createClient(ChatService, transport);
const conversations = createClient(ConversationService, transport);
const models = createClient(ModelService, transport);

function describe(error: unknown): string {
  if (error instanceof ConnectError) {
    switch (error.code) {
      case Code.Unauthenticated:
        return `Not signed in: ${error.rawMessage}`;
      case Code.PermissionDenied:
        return `Refused: ${error.rawMessage}`;
      case Code.ResourceExhausted:
        return `Over quota, try again shortly: ${error.rawMessage}`;
      case Code.InvalidArgument:
        return `Invalid request: ${error.rawMessage}`;
      case Code.Unavailable:
        return `The server is unavailable: ${error.rawMessage}`;
      default:
        return `${Code[error.code]}: ${error.rawMessage}`;
    }
  }
  return String(error);
}

function setStatus(text: string, isError = false): void {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", isError);
}

function addMessage(role: string, text: string): HTMLLIElement {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(body);
  ui.messages.append(item);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return item;
}

function addNote(item: HTMLLIElement, note: string): void {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = note;
  item.append(span);
}

async function showConversations(): Promise<void> {
  const reply = await conversations.listConversations({ pageSize: 50 });
  ui.conversations.replaceChildren(...reply.conversations.map(conversationItem));
}

function conversationItem(conversation: Conversation): HTMLLIElement {
  const item = document.createElement("li");
  item.textContent = conversation.title || "(untitled)";
  item.title = item.textContent;
  item.dataset.id = conversation.id;
  item.classList.toggle("current", conversation.id === conversationId);
  item.addEventListener("click", () => void openConversation(conversation.id));
  return item;
}

async function openConversation(id: string): Promise<void> {
  if (running !== null) return;
  conversationId = id;
  ui.messages.replaceChildren();
  for (const item of ui.conversations.children) {
    item.classList.toggle("current", (item as HTMLElement).dataset.id === id);
  }
  let pageToken = "";
  do {
    const page = await conversations.listMessages({ conversationId: id, pageSize: 100, pageToken });
    page.messages.forEach(showStored);
    pageToken = page.nextPageToken;
  } while (pageToken !== "");
}

function showStored(message: Message): void {
  const item = addMessage(message.role, message.content);
  if (message.role === "assistant" && !message.complete) addNote(item, "(incomplete)");
}

function finish(item: HTMLLIElement, finished: TurnFinished): void {
  switch (finished.finishReason) {
    case FinishReason.CONTENT_FILTER:
      item.classList.add("filtered");
      addNote(
        item,
        `Stopped by moderation${finished.filterCategory ? ` (${finished.filterCategory})` : ""}.`,
      );
      break;
    case FinishReason.LENGTH:
      addNote(item, "(cut at the length limit)");
      break;
    case FinishReason.CANCELLED:
      addNote(item, "(stopped)");
      break;
    default:
      break;
  }
  const usage = finished.usage;
  if (usage !== undefined) {
    setStatus(
      `${usage.completionTokens} tokens, first after ${Math.round(usage.timeToFirstTokenMs)} ms`,
    );
  }
}

async function ask(text: string): Promise<void> {
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.classList.add("streaming");
  const body = answer.querySelector(".text") as HTMLSpanElement;
  running = new AbortController();
  ui.send.hidden = true;
  ui.stop.hidden = false;
  setStatus("…");
  try {
    const stream = chat.complete(
      { conversationId, message: text, params: { maxTokens: MAX_TOKENS } },
      { signal: running.signal },
    );
    for await (const response of stream) {
      const event = response.event;
      if (event.case === "started") {
        const isNew = conversationId === "";
        conversationId = event.value.conversationId;
        if (isNew) void showConversations();
      } else if (event.case === "delta") {
        body.textContent += event.value.text;
        ui.messages.scrollTop = ui.messages.scrollHeight;
      } else if (event.case === "finished") {
        finish(answer, event.value);
      }
    }
  } catch (error) {
    if (error instanceof ConnectError && error.code === Code.Canceled) {
      addNote(answer, "(stopped)");
      setStatus("stopped");
    } else {
      addNote(answer, describe(error));
      setStatus(describe(error), true);
    }
  } finally {
    answer.classList.remove("streaming");
    answer.dataset.done = "true";
    running = null;
    ui.send.hidden = false;
    ui.stop.hidden = true;
  }
}

async function enter(): Promise<boolean> {
  try {
    await showConversations();
  } catch (error) {
    ui.signInError.textContent = describe(error);
    return false;
  }
  ui.signIn.hidden = true;
  ui.app.hidden = false;
  ui.signInError.textContent = "";
  try {
    const listed = await models.listModels({});
    ui.model.textContent = listed.models.map((model) => model.name).join(", ");
  } catch (error) {
    setStatus(describe(error), true);
  }
  ui.prompt.focus();
  return true;
}

function leave(): void {
  running?.abort();
  apiKey = "";
  conversationId = "";
  localStorage.removeItem(KEY_STORAGE);
  ui.messages.replaceChildren();
  ui.conversations.replaceChildren();
  ui.app.hidden = true;
  ui.signIn.hidden = false;
  ui.apiKey.value = "";
  ui.apiKey.focus();
}

ui.signIn.addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = ui.apiKey.value.trim();
  void enter().then((ok) => {
    if (ok) localStorage.setItem(KEY_STORAGE, apiKey);
  });
});
ui.signOut.addEventListener("click", leave);
ui.newChat.addEventListener("click", () => {
  if (running !== null) return;
  conversationId = "";
  ui.messages.replaceChildren();
  for (const item of ui.conversations.children) item.classList.remove("current");
  ui.prompt.focus();
});
ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (text === "" || running !== null) return;
  ui.prompt.value = "";
  void ask(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => running?.abort());

if (apiKey === "") {
  ui.signIn.hidden = false;
} else {
  void enter().then((ok) => {
    if (!ok) ui.signIn.hidden = false;
  });
}
