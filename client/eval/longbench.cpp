#include "longbench.h"

#include <fstream>
#include <map>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace defkv::eval {
namespace {

struct Prompt {
  const char* tmpl;
  int max_new_tokens;
};

// config/dataset2prompt.json and config/dataset2maxlen.json of LongBench v1 (English datasets).
const std::map<std::string, Prompt>& Prompts() {
  static const std::map<std::string, Prompt> m = {
      {"narrativeqa",
       {"You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128}},
      {"qasper",
       {"You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on "
        "the above article as concisely as you can, using a single phrase or sentence if possible. If the question "
        "cannot be answered based on the information in the article, write \"unanswerable\". If the question is a "
        "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: "
        "{input}\n\nAnswer:",
        128}},
      {"multifieldqa_en",
       {"Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64}},
      {"hotpotqa",
       {"Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        32}},
      {"2wikimqa",
       {"Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        32}},
      {"musique",
       {"Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        32}},
      {"gov_report",
       {"You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512}},
      {"qmsum",
       {"You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512}},
      {"multi_news",
       {"You are given several news passages. Write a one-page summary of all news.\n\nNews:\n{context}\n\nNow, "
        "write a one-page summary of all the news.\n\nSummary:",
        512}},
      {"trec",
       {"Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64}},
      {"triviaqa",
       {"Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32}},
      {"samsum",
       {"Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128}},
      {"passage_count",
       {"There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32}},
      {"passage_retrieval_en",
       {"Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
        "paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
        "etc.\n\nThe answer is: ",
        32}},
      {"lcc", {"Please complete the code given below. \n{context}Next line of code:\n", 64}},
      {"repobench-p", {"Please complete the code given below. \n{context}{input}Next line of code:\n", 64}},
  };
  return m;
}

std::string Stem(const std::string& path) {
  std::string name = path.substr(path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/') + 1);
  if (name.size() > 6 && name.compare(name.size() - 6, 6, ".jsonl") == 0) name.resize(name.size() - 6);
  if (name.size() > 2 && name.compare(name.size() - 2, 2, "_e") == 0) name.resize(name.size() - 2);  // LongBench-E
  return name;
}

std::vector<std::string> Strings(const nlohmann::json& j) {
  std::vector<std::string> out;
  if (j.is_string()) out.push_back(j.get<std::string>());
  if (j.is_array())
    for (const auto& x : j) out.push_back(x.is_string() ? x.get<std::string>() : x.dump());
  return out;
}

}  // namespace

std::vector<LongBenchRow> LoadLongBench(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::vector<LongBenchRow> rows;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      throw std::runtime_error(path + ":" + std::to_string(n) + ": not JSON: " + e.what());
    }
    LongBenchRow r;
    r.dataset = j.contains("dataset") && j["dataset"].is_string() ? j["dataset"].get<std::string>() : Stem(path);
    r.id = j.contains("_id") ? (j["_id"].is_string() ? j["_id"].get<std::string>() : j["_id"].dump())
                             : std::to_string(n);
    if (!j.contains("context") || !j.contains("input") || !j.contains("answers"))
      throw std::runtime_error(path + ":" + std::to_string(n) + ": needs context, input and answers");
    r.context = j["context"].is_string() ? j["context"].get<std::string>() : "";
    r.input = j["input"].is_string() ? j["input"].get<std::string>() : "";
    r.answers = Strings(j["answers"]);
    if (j.contains("all_classes")) r.all_classes = Strings(j["all_classes"]);
    rows.push_back(std::move(r));
  }
  return rows;
}

bool LongBenchSupported(const std::string& dataset) { return Prompts().count(dataset) > 0; }

Sample BuildLongBench(const LongBenchRow& row, int index) {
  auto it = Prompts().find(row.dataset);
  if (it == Prompts().end())
    throw std::invalid_argument("LongBench dataset '" + row.dataset + "' is not supported (Chinese datasets need "
                                "metrics not implemented here)");
  std::string t = it->second.tmpl;
  const size_t c = t.find("{context}");
  std::string before = t.substr(0, c), after = t.substr(c + 9);
  for (size_t p = after.find("{input}"); p != std::string::npos; p = after.find("{input}", p + row.input.size()))
    after.replace(p, 7, row.input);
  Sample s;
  s.task = row.dataset;
  s.index = index;
  s.context = before + row.context;
  s.question = after;
  s.answers = row.answers;
  s.all_classes = row.all_classes;
  s.max_new_tokens = it->second.max_new_tokens;
  const auto& d = row.dataset;
  s.use_chat_template = !(d == "trec" || d == "triviaqa" || d == "samsum" || d == "lcc" || d == "repobench-p");
  if (d == "samsum") s.stop = {"\n"};
  return s;
}

}  // namespace defkv::eval
