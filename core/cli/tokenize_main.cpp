// defkv-tokenize: a line-oriented JSON front end to the tokenizer, for tests and debugging.
//   defkv-tokenize --tokenizer PATH < requests.jsonl > replies.jsonl
// Each input line is one request ({"op": "encode" | "decode" | "stream" | "chat" | "info"}); each
// gets exactly one output line. Load failures exit with code 2.
#include <filesystem>
#include <iostream>
#include <string>

#include "core/tokenizer/chat_template.h"
#include "core/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace {

using nlohmann::json;
using defkv::tok::ChatTemplate;
using defkv::tok::Tokenizer;

json Handle(const json& req, const Tokenizer& tok, const ChatTemplate* chat,
            const std::string& chat_error) {
  const std::string op = req.value("op", "");
  if (op == "encode") {
    return {{"ids", tok.Encode(req.at("text").get<std::string>(), req.value("parse_special", true))}};
  }
  if (op == "decode") {
    return {{"text", tok.Decode(req.at("ids").get<std::vector<int32_t>>(),
                                req.value("skip_special", false))}};
  }
  if (op == "stream") {
    defkv::tok::IncrementalDecoder dec(tok, req.value("skip_special", false));
    json pieces = json::array();
    for (int32_t id : req.at("ids").get<std::vector<int32_t>>()) pieces.push_back(dec.Push(id));
    pieces.push_back(dec.Flush());
    return {{"pieces", pieces}};
  }
  if (op == "info") {
    return {{"vocab_size", tok.vocab_size()}, {"lossless", tok.lossless()},
            {"describe", tok.Describe()}};
  }
  if (op == "chat") {
    if (chat == nullptr) return {{"error", chat_error}};
    std::vector<defkv::tok::ChatMessage> msgs;
    for (const auto& m : req.at("messages"))
      msgs.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>()});
    ChatTemplate tmpl = *chat;
    if (req.contains("date_string")) tmpl.set_date_string(req.at("date_string").get<std::string>());
    return {{"text", tmpl.Render(msgs, req.value("add_generation_prompt", true), req.value("enable_thinking", true))},
            {"format", chat->name()}};
  }
  return {{"error", "unknown op '" + op + "'"}};
}

}  // namespace

int main(int argc, char** argv) {
  std::string path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokenizer" && i + 1 < argc) path = argv[++i];
  }
  if (path.empty()) {
    std::cerr << "usage: defkv-tokenize --tokenizer PATH  (JSON lines on stdin)\n";
    return 2;
  }
  auto tok = Tokenizer::Load(path);
  if (!tok.ok()) {
    std::cerr << "defkv-tokenize: " << tok.status().message() << "\n";
    return 2;
  }
  namespace fs = std::filesystem;
  const std::string dir = fs::is_directory(path) ? path : fs::path(path).parent_path().string();
  auto chat = ChatTemplate::FromModelDir(dir);
  const std::string chat_error = chat.ok() ? "" : std::string(chat.status().message());

  std::ios::sync_with_stdio(false);
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    json reply;
    try {
      reply = Handle(json::parse(line), **tok, chat.ok() ? &*chat : nullptr, chat_error);
    } catch (const json::exception& e) {
      reply = {{"error", e.what()}};
    }
    // Invalid UTF-8 cannot occur in replies: decoded text is always repaired with U+FFFD.
    std::cout << reply.dump(-1, ' ', true, json::error_handler_t::replace) << "\n";
    std::cout.flush();
  }
  return 0;
}
