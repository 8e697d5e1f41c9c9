// A Tokenwire client in C++ over TLS with an API key:
//   1. one streamed Converse turn, printing its deltas as they come;
//   2. a second turn on the same stream, cancelled with CancelTurn mid-answer;
//   3. the caller's conversations.
// Every line on stdout is "name: value" (delta text JSON-quoted), so a script can
// check it; errors go to stderr and the exit status is non-zero.

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>

#include "tokenwire/v1/chat.grpc.pb.h"
#include "tokenwire/v1/conversations.grpc.pb.h"

namespace {

namespace v1 = tokenwire::v1;

const char kUsage[] = R"(usage: tokenwire_client [options]
  --address HOST:PORT  the server (env TOKENWIRE_ADDRESS, default 127.0.0.1:50051)
  --ca FILE            PEM CA bundle that signed the server's certificate
                       (env TOKENWIRE_CA_FILE; default: the system's roots)
  --api-key KEY        API key sent as "authorization: Bearer KEY" (env TOKENWIRE_API_KEY)
  --message TEXT       the first turn's message (default "Hello!")
  --timeout-s N        give up after N seconds (default 60)
)";

struct Options {
  std::string address;
  std::string ca_file;
  std::string api_key;
  std::string message = "Hello!";
  int timeout_s = 60;
};

std::string FromEnv(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : fallback;
}

Options ParseOptions(int argc, char** argv) {
  Options options;
  options.address = FromEnv("TOKENWIRE_ADDRESS", "127.0.0.1:50051");
  options.ca_file = FromEnv("TOKENWIRE_CA_FILE", "");
  options.api_key = FromEnv("TOKENWIRE_API_KEY", "");
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::runtime_error("missing value for " + flag + "\n" + kUsage);
    const std::string value = argv[++i];
    if (flag == "--address") {
      options.address = value;
    } else if (flag == "--ca") {
      options.ca_file = value;
    } else if (flag == "--api-key") {
      options.api_key = value;
    } else if (flag == "--message") {
      options.message = value;
    } else if (flag == "--timeout-s") {
      options.timeout_s = std::stoi(value);
    } else {
      throw std::runtime_error("unknown option " + flag + "\n" + kUsage);
    }
  }
  if (options.api_key.empty()) {
    throw std::runtime_error("an API key is required: --api-key or TOKENWIRE_API_KEY");
  }
  return options;
}

std::string ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path);
  std::ostringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

// Text as a JSON string literal: one output line per delta, whatever the text holds.
std::string Quoted(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
          out += escaped;
        } else {
          out += static_cast<char>(c);  // UTF-8 passes through, as JSON allows
        }
    }
  }
  return out + "\"";
}

std::string Reason(v1::FinishReason reason) {
  const std::string name = v1::FinishReason_Name(reason);
  const std::string prefix = "FINISH_REASON_";
  return name.rfind(prefix, 0) == 0 ? name.substr(prefix.size()) : name;
}

// Call credentials: the key goes with every call, and only ever over TLS.
class ApiKeyPlugin : public grpc::MetadataCredentialsPlugin {
 public:
  explicit ApiKeyPlugin(std::string key) : header_("Bearer " + std::move(key)) {}

  grpc::Status GetMetadata(grpc::string_ref, grpc::string_ref, const grpc::AuthContext&,
                           std::multimap<grpc::string, grpc::string>* metadata) override {
    metadata->insert({"authorization", header_});
    return grpc::Status::OK;
  }

 private:
  std::string header_;
};

std::shared_ptr<grpc::Channel> Connect(const Options& options) {
  grpc::SslCredentialsOptions tls;
  if (!options.ca_file.empty()) tls.pem_root_certs = ReadFile(options.ca_file);
  auto credentials = grpc::CompositeChannelCredentials(
      grpc::SslCredentials(tls),
      grpc::MetadataCredentialsFromPlugin(std::make_unique<ApiKeyPlugin>(options.api_key)));
  return grpc::CreateChannel(options.address, credentials);
}

std::string StatusText(const grpc::Status& status) {
  return "status " + std::to_string(status.error_code()) + ": " + status.error_message();
}

using ConverseStream = grpc::ClientReaderWriter<v1::ConverseRequest, v1::ConverseResponse>;

// The next event of the stream; a TurnError or an ended stream is an error.
v1::ConverseResponse Next(ConverseStream& stream) {
  v1::ConverseResponse event;
  if (!stream.Read(&event)) {
    throw std::runtime_error("the Converse stream ended: " + StatusText(stream.Finish()));
  }
  if (event.has_error()) {
    const auto& error = event.error();
    throw std::runtime_error("turn refused: " + error.error_type() + " (code " +
                             std::to_string(error.code()) + "): " + error.message());
  }
  return event;
}

void Write(ConverseStream& stream, const v1::ConverseRequest& request) {
  if (!stream.Write(request)) {
    throw std::runtime_error("the Converse stream closed: " + StatusText(stream.Finish()));
  }
}

void Converse(v1::ChatService::Stub& chat, const Options& options,
              std::chrono::system_clock::time_point deadline) {
  grpc::ClientContext context;
  context.set_deadline(deadline);
  std::unique_ptr<ConverseStream> stream = chat.Converse(&context);

  // Turn 1: to its end, printing each delta as it arrives.
  v1::ConverseRequest request;
  request.mutable_start()->set_message(options.message);
  Write(*stream, request);
  v1::ConverseResponse event = Next(*stream);
  const v1::TurnStarted first = event.started();
  std::cout << "conversation: " << first.conversation_id() << "\n"
            << "turn: " << first.turn_id() << "\n"
            << "model: " << first.model() << std::endl;
  for (event = Next(*stream); event.has_delta(); event = Next(*stream)) {
    std::cout << "delta: " << Quoted(event.delta().text()) << std::endl;
  }
  const v1::Usage& usage = event.finished().usage();
  std::cout << "finished: " << Reason(event.finished().finish_reason()) << "\n"
            << "usage: prompt_tokens=" << usage.prompt_tokens()
            << " completion_tokens=" << usage.completion_tokens() << std::endl;

  // Turn 2, same conversation: cancelled once its first delta is here.
  request.Clear();
  request.mutable_start()->set_conversation_id(first.conversation_id());
  request.mutable_start()->set_message("Tell me a long story.");
  Write(*stream, request);
  const v1::TurnStarted second = Next(*stream).started();
  std::cout << "turn: " << second.turn_id() << std::endl;
  bool cancel_sent = false;
  for (event = Next(*stream); event.has_delta(); event = Next(*stream)) {
    // Deltas already on the wire when the cancel lands are part of the answer too.
    std::cout << "partial: " << Quoted(event.delta().text()) << std::endl;
    if (!cancel_sent) {
      request.Clear();
      request.mutable_cancel()->set_turn_id(second.turn_id());
      Write(*stream, request);
      cancel_sent = true;
    }
  }
  const std::string cancelled = Reason(event.finished().finish_reason());
  std::cout << "cancelled: " << cancelled << std::endl;
  if (cancelled != "CANCELLED") {
    // STOP: the whole answer was out before the cancel arrived (a very fast model).
    throw std::runtime_error("the cancelled turn finished with " + cancelled + ", not CANCELLED");
  }

  // Half-close: the server ends the stream with OK.
  stream->WritesDone();
  while (stream->Read(&event)) {
  }
  const grpc::Status status = stream->Finish();
  if (!status.ok()) throw std::runtime_error("Converse ended with " + StatusText(status));
}

void ListConversations(v1::ConversationService::Stub& conversations,
                       std::chrono::system_clock::time_point deadline) {
  grpc::ClientContext context;
  context.set_deadline(deadline);
  v1::ListConversationsRequest request;
  request.set_page_size(100);
  v1::ListConversationsResponse response;
  const grpc::Status status = conversations.ListConversations(&context, request, &response);
  if (!status.ok()) throw std::runtime_error("ListConversations: " + StatusText(status));
  std::cout << "conversations: " << response.conversations_size() << std::endl;
  for (const auto& conversation : response.conversations()) {
    std::cout << "listed: " << conversation.id() << std::endl;
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options options = ParseOptions(argc, argv);
    const auto channel = Connect(options);
    const auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(options.timeout_s);
    auto chat = v1::ChatService::NewStub(channel);
    auto conversations = v1::ConversationService::NewStub(channel);
    Converse(*chat, options, deadline);
    ListConversations(*conversations, deadline);
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << std::endl;
    return 1;
  }
  return 0;
}
