#include "ruler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <stdexcept>

namespace defkv::eval {

uint64_t Rng::Next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

int64_t Rng::Uniform(int64_t lo, int64_t hi) {
  const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
  if (span == 0) return static_cast<int64_t>(Next());  // the whole 64-bit range
  const uint64_t limit = UINT64_MAX - UINT64_MAX % span;
  uint64_t x;
  do x = Next();
  while (x >= limit);
  return lo + static_cast<int64_t>(x % span);
}

std::vector<size_t> Rng::Sample(size_t n, size_t k) {
  if (k > n) throw std::invalid_argument("Rng::Sample: k > n");
  std::vector<size_t> all(n);
  for (size_t i = 0; i < n; ++i) all[i] = i;
  // Partial Fisher-Yates: the first k positions are the draw.
  for (size_t i = 0; i < k; ++i) std::swap(all[i], all[static_cast<size_t>(Uniform(i, n - 1))]);
  all.resize(k);
  return all;
}

uint64_t SampleSeed(uint64_t seed, const std::string& task, int index) {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a over the task name
  for (unsigned char c : task) h = (h ^ c) * 1099511628211ULL;
  Rng r(seed ^ h ^ (static_cast<uint64_t>(index) * 0xD1B54A32D192ED03ULL));
  return r.Next();
}

// Word lists written for this project (RULER draws keys from wonderwords' lists, which are not
// available offline). Keys are adjective-noun pairs: 120 x 140 = 16,800 combinations.
const std::vector<std::string>& Adjectives() {
  static const std::vector<std::string> v = {
      "able", "absent", "acid", "active", "agile", "amber", "ancient", "angry", "arctic", "awake",
      "bad", "bald", "bitter", "black", "bland", "blue", "bold", "brave", "brief", "bright",
      "broad", "broken", "brown", "busy", "calm", "careful", "cheap", "cheerful", "chilly", "clean",
      "clever", "cloudy", "coarse", "cold", "cool", "crazy", "crisp", "cruel", "curious", "damp",
      "dark", "dear", "deep", "dense", "dizzy", "dry", "dull", "dusty", "eager", "early",
      "easy", "elegant", "empty", "even", "exotic", "faint", "fair", "fancy", "fast", "fierce",
      "flat", "fluffy", "fond", "foolish", "fresh", "friendly", "funny", "fuzzy", "gentle", "giant",
      "glad", "golden", "grand", "gray", "green", "grumpy", "happy", "hard", "harsh", "heavy",
      "hollow", "honest", "huge", "humble", "hungry", "icy", "idle", "jolly", "keen", "kind",
      "large", "late", "lazy", "light", "little", "lively", "lonely", "loud", "lucky", "mellow",
      "mighty", "modern", "narrow", "neat", "nervous", "noisy", "odd", "old", "orange", "pale",
      "plain", "polite", "proud", "purple", "quick", "quiet", "rapid", "rare", "rich", "rough"};
  return v;
}

const std::vector<std::string>& Nouns() {
  static const std::vector<std::string> v = {
      "anchor", "apple", "arrow", "badge", "bakery", "balloon", "banjo", "barrel", "basket", "beacon",
      "bell", "bicycle", "blanket", "boat", "bottle", "bracelet", "bridge", "broom", "bucket", "button",
      "cabin", "cactus", "camera", "candle", "canyon", "carpet", "castle", "cathedral", "chair", "chimney",
      "circus", "clock", "cloud", "compass", "cookie", "cottage", "crayon", "crown", "curtain", "cushion",
      "desert", "diamond", "dolphin", "dragon", "drum", "eagle", "engine", "envelope", "falcon", "feather",
      "fence", "fiddle", "forest", "fountain", "garden", "garlic", "glacier", "glove", "guitar", "hammer",
      "harbor", "helmet", "honey", "island", "jacket", "jungle", "kettle", "kitten", "ladder", "lantern",
      "lemon", "library", "lighthouse", "lizard", "magnet", "mango", "meadow", "mirror", "monkey", "mountain",
      "needle", "notebook", "ocean", "orchard", "otter", "oyster", "paddle", "palace", "parrot", "pebble",
      "pencil", "pepper", "piano", "pillow", "planet", "pocket", "pumpkin", "puzzle", "rabbit", "radio",
      "river", "rocket", "saddle", "sailor", "sandal", "scarf", "shadow", "shovel", "signal", "spider",
      "spoon", "squirrel", "statue", "stone", "sunset", "tablet", "teapot", "tiger", "tower", "tractor",
      "trumpet", "tunnel", "umbrella", "valley", "violin", "volcano", "wagon", "walnut", "whistle", "window",
      "wizard", "yacht", "zebra", "harvest", "marble", "meteor", "nugget", "pirate", "quarry", "riddle"};
  return v;
}

const std::vector<std::string>& Verbs() {
  static const std::vector<std::string> v = {
      "build", "carry", "change", "check", "choose", "clean", "climb", "collect", "count", "cover",
      "create", "design", "discover", "draw", "explain", "explore", "fix", "follow", "gather", "guard",
      "improve", "invent", "judge", "keep", "launch", "measure", "mend", "move", "notice", "open",
      "paint", "plan", "polish", "predict", "protect", "question", "reach", "repair", "rescue", "review",
      "sell", "share", "shape", "sketch", "solve", "sort", "study", "support", "teach", "test",
      "trade", "trust", "understand", "visit", "wander", "watch", "weigh", "win", "wrap", "write"};
  return v;
}

const char* const kNoiseSentence =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

namespace {

const std::string& Pick(Rng& r, const std::vector<std::string>& v) {
  return v[static_cast<size_t>(r.Uniform(0, static_cast<int64_t>(v.size()) - 1))];
}

// The essay haystack: prose generated from templates with a fixed seed, so every sample (and
// every run) shares the same text, as RULER's Paul Graham haystack does. It reads like advice
// essays, which keeps it natural language without any downloaded text.
const char* const kEssayTemplates[] = {
    "The {a} {n} can {v} the {n} before the {n} arrives.",
    "Most people who {v} a {n} never think about the {a} {n}.",
    "In the end, a {a} {n} is only as good as the {n} behind it.",
    "When you {v} a {n}, the {n} tends to become more {a}.",
    "It is easy to {v} the {n}, but it is hard to {v} a {a} {n}.",
    "Startups that {v} the {a} {n} often find a better {n}.",
    "A {n} that seems {a} today may look {a} in ten years.",
    "The reason is simple: nobody wants to {v} a {a} {n}.",
    "So I tried to {v} the {n} with a {a} {n} instead.",
    "Good writers {v} every {n} until the {n} feels {a}.",
    "There is no {a} way to {v} a {n}.",
    "If the {n} is {a}, the {n} will {v} the rest.",
    "What surprised me most was how {a} the {n} became once we chose to {v} it.",
    "You learn more when you {v} a {a} {n} than when you read about a {n}.",
};

std::string FillTemplate(Rng& r, const std::string& t) {
  std::string out;
  for (size_t i = 0; i < t.size(); ++i) {
    if (t[i] == '{' && i + 2 < t.size() && t[i + 2] == '}') {
      const char k = t[i + 1];
      out += k == 'a' ? Pick(r, Adjectives()) : k == 'n' ? Pick(r, Nouns()) : Pick(r, Verbs());
      i += 2;
    } else {
      out += t[i];
    }
  }
  return out;
}

// A deterministic stream of essay words, grown on demand and shared by all callers.
const std::vector<std::string>& EssayWordList(size_t need) {
  static std::vector<std::string> words;
  static Rng rng(0xE55A7ULL);
  constexpr size_t kTemplates = sizeof(kEssayTemplates) / sizeof(kEssayTemplates[0]);
  while (words.size() < need) {
    const std::string s = FillTemplate(rng, kEssayTemplates[rng.Uniform(0, kTemplates - 1)]);
    size_t start = 0;
    while (start < s.size()) {
      size_t end = s.find(' ', start);
      if (end == std::string::npos) end = s.size();
      words.push_back(s.substr(start, end - start));
      start = end + 1;
    }
  }
  return words;
}

std::string Join(const std::vector<std::string>& v, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

void ReplaceAll(std::string& s, const std::string& from, const std::string& to) {
  for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
}

std::string RandomNumber(Rng& r) { return std::to_string(r.Uniform(1000000, 9999999)); }  // 7 digits

std::string RandomUuid(Rng& r) {  // UUID version 4 layout
  const uint64_t hi = r.Next(), lo = r.Next();
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%08x-%04x-4%03x-%04x-%012llx", static_cast<unsigned>(hi >> 32),
                static_cast<unsigned>((hi >> 16) & 0xFFFF), static_cast<unsigned>(hi & 0xFFF),
                static_cast<unsigned>(0x8000 | ((lo >> 48) & 0x3FFF)),
                static_cast<unsigned long long>(lo & 0xFFFFFFFFFFFFULL));
  return buf;
}

std::string RandomWordKey(Rng& r) { return Pick(r, Adjectives()) + "-" + Pick(r, Nouns()); }

std::string RandomLetters(Rng& r, int k, char base) {
  std::string s;
  for (int i = 0; i < k; ++i) s += static_cast<char>(base + r.Uniform(0, 25));
  return s;
}

// The word pool for cwe: the lists above, then made-up pronounceable words when a long context
// needs more distinct words than the lists hold (RULER falls back to a large English list).
const std::vector<std::string>& CweWords(size_t need) {
  static std::vector<std::string> words;
  static std::set<std::string> seen;
  static Rng rng(0xC3EULL);
  if (words.empty()) {
    for (const auto* list : {&Nouns(), &Adjectives(), &Verbs()})
      for (const auto& w : *list)
        if (seen.insert(w).second) words.push_back(w);
  }
  static const char* kOnsets[] = {"b", "br", "d", "f", "g", "gr", "k", "l", "m", "n", "p", "pl", "r", "s", "st", "t", "tr", "v", "z"};
  static const char* kVowels[] = {"a", "e", "i", "o", "u", "ai", "ea", "oo"};
  if (need > 1000000) throw std::invalid_argument("cwe: more than a million distinct words asked for");
  while (words.size() < need) {
    std::string w;
    const int syllables = static_cast<int>(rng.Uniform(2, 3));
    for (int i = 0; i < syllables; ++i) w += std::string(kOnsets[rng.Uniform(0, 18)]) + kVowels[rng.Uniform(0, 7)];
    if (seen.insert(w).second) words.push_back(w);
  }
  return words;
}

// How many distinct real words open the cwe pool (the lists share a few words).
size_t RealWordCount() {
  static const size_t n = [] {
    std::set<std::string> all;
    for (const auto* list : {&Nouns(), &Adjectives(), &Verbs()}) all.insert(list->begin(), list->end());
    return all.size();
  }();
  return n;
}

struct NiahSpec {
  const char* haystack;  // "noise", "essay" or "needle"
  bool key_words;        // key: adjective-noun (true) or uuid (false)
  bool value_numbers;    // value: 7-digit number (true) or uuid (false)
  int k, v, q;           // keys, values per key, keys queried
};

const std::map<std::string, NiahSpec>& NiahSpecs() {
  static const std::map<std::string, NiahSpec> m = {
      {"niah_single_1", {"noise", true, true, 1, 1, 1}},
      {"niah_single_2", {"essay", true, true, 1, 1, 1}},
      {"niah_single_3", {"essay", true, false, 1, 1, 1}},
      {"niah_multikey_1", {"essay", true, true, 4, 1, 1}},
      {"niah_multikey_2", {"needle", true, true, 1, 1, 1}},
      {"niah_multikey_3", {"needle", false, false, 1, 1, 1}},
      {"niah_multivalue", {"essay", true, true, 1, 4, 1}},
      {"niah_multiquery", {"essay", true, true, 4, 1, 4}},
  };
  return m;
}

Sample BuildNiah(const std::string& task, const NiahSpec& s, int size, Rng& r) {
  std::string type_v = s.value_numbers ? "numbers" : "uuids";
  std::string tmpl =
      "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
      "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
      "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
      "|| The special magic {type_needle_v} for {query} mentioned in the provided text are";
  if (s.q * s.v == 1) {  // RULER's singular rewrite
    ReplaceAll(tmpl, "Some", "A");
    ReplaceAll(tmpl, "are all", "is");
    ReplaceAll(tmpl, "are", "is");
    type_v.pop_back();
  }
  auto key = [&] { return s.key_words ? RandomWordKey(r) : RandomUuid(r); };
  auto value = [&] { return s.value_numbers ? RandomNumber(r) : RandomUuid(r); };
  auto needle = [&](const std::string& k, const std::string& v) {
    return "One of the special magic " + type_v + " for " + k + " is: " + v + ".";
  };
  std::vector<std::string> keys;
  std::set<std::string> used;
  while (static_cast<int>(keys.size()) < s.k) {
    std::string k = key();
    if (used.insert(k).second) keys.push_back(k);
  }
  std::vector<std::vector<std::string>> values(keys.size());
  std::vector<std::string> needles;
  for (size_t i = 0; i < keys.size(); ++i)
    for (int j = 0; j < s.v; ++j) {
      values[i].push_back(value());
      needles.push_back(needle(keys[i], values[i].back()));
    }
  r.Shuffle(needles);

  std::string context;
  const std::string hay = s.haystack;
  if (hay == "noise") {
    std::vector<std::string> lines(static_cast<size_t>(size), kNoiseSentence);
    auto idx = r.Sample(lines.size() + 1, needles.size());  // +1: a needle may also go last
    std::sort(idx.begin(), idx.end(), std::greater<>());
    for (size_t i = 0; i < idx.size(); ++i) lines.insert(lines.begin() + static_cast<long>(idx[i]), needles[i]);
    context = Join(lines, "\n");
  } else if (hay == "needle") {
    // Every line is a needle; distractor keys never repeat a real key, so only one line answers.
    std::vector<std::string> lines;
    for (int i = 0; i < size; ++i) {
      std::string k = key();
      while (used.count(k)) k = key();
      lines.push_back(needle(k, value()));
    }
    auto idx = r.Sample(lines.size() + 1, needles.size());
    std::sort(idx.begin(), idx.end(), std::greater<>());
    for (size_t i = 0; i < idx.size(); ++i) lines.insert(lines.begin() + static_cast<long>(idx[i]), needles[i]);
    context = Join(lines, "\n");
  } else {  // essay: needles at depths drawn from round(linspace(0, 100, 40)) % of the sentences
    const auto sents = SplitSentences(EssayWords(size));
    std::vector<int> depths;
    for (int i = 0; i < 40; ++i) depths.push_back(static_cast<int>(std::lround(100.0 * i / 39.0)));
    auto pick = r.Sample(depths.size(), needles.size());
    std::vector<size_t> pos = {0};
    for (size_t p : pick) pos.push_back(sents.size() * static_cast<size_t>(depths[p]) / 100);
    std::sort(pos.begin() + 1, pos.end());
    pos.push_back(sents.size());
    std::vector<std::string> parts;
    for (size_t i = 1; i < pos.size(); ++i) {
      std::vector<std::string> chunk(sents.begin() + static_cast<long>(pos[i - 1]), sents.begin() + static_cast<long>(pos[i]));
      if (!chunk.empty()) parts.push_back(Join(chunk, " "));
      if (i - 1 < needles.size()) parts.push_back(needles[i - 1]);
    }
    context = Join(parts, " ");
  }

  std::vector<std::string> queried(keys.begin(), keys.begin() + s.q);
  std::string query = queried.size() == 1 ? queried[0] : "";
  if (queried.size() > 1) {
    query = Join(std::vector<std::string>(queried.begin(), queried.end() - 1), ", ") + ", and " + queried.back();
  }
  Sample out;
  for (int i = 0; i < s.q; ++i)
    for (const auto& v : values[static_cast<size_t>(i)]) out.answers.push_back(v);
  ReplaceAll(tmpl, "{type_needle_v}", type_v);
  ReplaceAll(tmpl, "{query}", query);
  const size_t c = tmpl.find("{context}"), bar = tmpl.find("||");
  out.context = tmpl.substr(0, c) + context + tmpl.substr(c + 9, bar - c - 9);
  // The question starts after the context's trailing newline; the context/question split follows
  // the seed: the question is never part of the compressed context.
  const size_t nl = out.context.rfind('\n');
  out.question = out.context.substr(nl + 1);
  out.context.resize(nl + 1);
  out.answer_prefix = tmpl.substr(bar + 2);
  (void)task;
  return out;
}

// vt: one chain of 4 hops hidden in noise lines; an in-context example (smaller, renamed) first.
struct VtInstance {
  std::string text;  // the filled template up to and including the answer prefix
  std::string question, prefix;
  std::vector<std::string> vars;
  std::string context;
};

VtInstance BuildVtInstance(Rng& r, int noise_lines) {
  std::vector<std::string> vars;
  std::set<std::string> seen;
  while (vars.size() < 5) {
    std::string v = RandomLetters(r, 5, 'A');
    if (seen.insert(v).second) vars.push_back(v);
  }
  const std::string value = std::to_string(r.Uniform(10000, 99999));
  std::vector<std::string> chain = {"VAR " + vars[0] + " = " + value};
  for (size_t j = 1; j < vars.size(); ++j) chain.push_back("VAR " + vars[j] + " = VAR " + vars[j - 1] + " ");
  std::vector<std::string> lines(static_cast<size_t>(noise_lines), kNoiseSentence);
  // Distinct slots as RULER draws them; a haystack too short for that (tiny test contexts) lets
  // hops share a slot, which still keeps them in order.
  std::vector<size_t> pos;
  if (lines.size() + 1 >= chain.size()) {
    pos = r.Sample(lines.size() + 1, chain.size());
  } else {
    for (size_t j = 0; j < chain.size(); ++j) pos.push_back(static_cast<size_t>(r.Uniform(0, static_cast<int64_t>(lines.size()))));
  }
  std::sort(pos.begin(), pos.end());
  for (size_t j = 0; j < chain.size(); ++j) lines.insert(lines.begin() + static_cast<long>(pos[j] + j), chain[j]);
  VtInstance out;
  out.vars = vars;
  out.context = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n" +
                Join(lines, "\n") + "\n";
  out.question = "Question: Find all variables that are assigned the value " + value + " in the text above.";
  out.prefix = " Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
               "assigned the value " + value + ", they are: ";
  return out;
}

Sample BuildVt(int size, Rng& r) {
  // RULER's example is about 500 tokens; it shrinks with the haystack so short contexts still fit.
  const int icl_lines = std::max(2, std::min(20, size / 8));
  VtInstance icl = BuildVtInstance(r, icl_lines);
  VtInstance main = BuildVtInstance(r, size);
  Sample s;
  s.context = icl.context + icl.question + icl.prefix + Join(icl.vars, " ") + "\n\n" + main.context;
  s.question = main.question;
  s.answer_prefix = main.prefix;
  s.answers = main.vars;
  return s;
}

// cwe: `num_words` distinct words, the first 10 repeated `common` times, the others `uncommon`.
std::pair<std::string, std::vector<std::string>> CweList(Rng& r, int num_words, int common, int uncommon) {
  // Draw from the real words, and from made-up ones only as far as needed: the pool is shared and
  // grows with earlier calls, and a draw must not depend on what was built before.
  const auto& pool = CweWords(static_cast<size_t>(num_words));
  auto idx = r.Sample(std::max(static_cast<size_t>(num_words), RealWordCount()), static_cast<size_t>(num_words));
  std::vector<std::string> list, answers;
  for (size_t i = 0; i < idx.size(); ++i) {
    const int reps = i < 10 ? common : uncommon;
    if (i < 10) answers.push_back(pool[idx[i]]);
    for (int j = 0; j < reps; ++j) list.push_back(pool[idx[i]]);
  }
  r.Shuffle(list);
  std::string text;
  for (size_t i = 0; i < list.size(); ++i) text += (i ? " " : "") + std::to_string(i + 1) + ". " + list[i];
  return {text, answers};
}

Sample BuildCwe(int size, Rng& r, bool short_context) {
  const std::string head =
      "Below is a numbered list of words. In these words, some appear more often than others. "
      "Memorize the ones that appear most often.\n";
  const std::string question = "Question: What are the 10 most common words in the above list?";
  const std::string prefix = " Answer: The top 10 words that appear most often in the list are:";
  // RULER: below 4K tokens the example and the list repeat words less (3/1 and 6/1).
  auto [ex_text, ex_answers] = short_context ? CweList(r, 20, 3, 1) : CweList(r, 40, 10, 3);
  auto [text, answers] = short_context ? CweList(r, std::max(10, size), 6, 1) : CweList(r, std::max(10, size), 30, 3);
  std::string ex_answer;
  for (size_t i = 0; i < ex_answers.size(); ++i) ex_answer += " " + std::to_string(i + 1) + ". " + ex_answers[i];
  Sample s;
  s.context = head + ex_text + "\n" + question + prefix + ex_answer + "\n\n" + head + text + "\n";
  s.question = question;
  s.answer_prefix = prefix;
  s.answers = answers;
  return s;
}

// fwe: coded words with Zipf(2) counts for `num_words` draws; rank 1 is replaced by dots.
Sample BuildFwe(int size, int64_t length, Rng& r) {
  const int vocab_size = std::max(10, static_cast<int>(length / 50));
  std::vector<std::string> vocab;
  std::set<std::string> seen;
  while (static_cast<int>(vocab.size()) < vocab_size) {
    std::string w = RandomLetters(r, 6, 'a');
    if (seen.insert(w).second) vocab.push_back(w);
  }
  std::sort(vocab.begin(), vocab.end());
  r.Shuffle(vocab);
  vocab[0] = "...";
  const double zeta2 = M_PI * M_PI / 6.0;
  std::vector<std::string> words;
  for (size_t k = 0; k < vocab.size(); ++k) {
    const auto count = static_cast<int64_t>(size * std::pow(static_cast<double>(k + 1), -2.0) / zeta2);
    for (int64_t j = 0; j < count; ++j) words.push_back(vocab[k]);
  }
  r.Shuffle(words);
  Sample s;
  s.context = "Read the following coded text and track the frequency of each coded word. Find the three most "
              "frequently appeared coded words. " + Join(words, " ") + "\n";
  s.question = "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
               "frequently appeared words in the above coded text?";
  s.answer_prefix = " Answer: According to the coded text above, the three most frequently appeared words are:";
  s.answers = {vocab[1], vocab[2], vocab[3]};
  return s;
}

}  // namespace

std::string EssayWords(int words) {
  const auto& all = EssayWordList(static_cast<size_t>(std::max(words, 0)));
  return Join(std::vector<std::string>(all.begin(), all.begin() + std::max(words, 0)), " ");
}

std::vector<std::string> SplitSentences(const std::string& text) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if ((c == '.' || c == '!' || c == '?') && (i + 1 == text.size() || text[i + 1] == ' ' || text[i + 1] == '\n')) {
      out.push_back(text.substr(start, i + 1 - start));
      start = i + 1;
      while (start < text.size() && (text[start] == ' ' || text[start] == '\n')) ++start;
      i = start - 1;
    }
  }
  if (start < text.size()) out.push_back(text.substr(start));
  return out;
}

int CountOccurrences(const std::string& text, const std::string& needle) {
  if (needle.empty()) return 0;
  int n = 0;
  for (size_t p = text.find(needle); p != std::string::npos; p = text.find(needle, p + needle.size())) ++n;
  return n;
}

const std::vector<std::string>& RulerTasks() {
  static const std::vector<std::string> v = {
      "cwe", "fwe", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3", "niah_multiquery",
      "niah_multivalue", "niah_single_1", "niah_single_2", "niah_single_3", "vt"};
  return v;
}

bool IsRulerTask(const std::string& task) {
  const auto& v = RulerTasks();
  return std::find(v.begin(), v.end(), task) != v.end();
}

int RulerMaxNewTokens(const std::string& task) {
  if (task == "vt") return 30;
  if (task == "cwe") return 120;
  if (task == "fwe") return 50;
  return 128;  // niah_*
}

Sample BuildRuler(const std::string& task, int size, uint64_t seed, int index, int64_t length) {
  Rng r(SampleSeed(seed, task, index));
  Sample s;
  size = std::max(size, 1);
  if (auto it = NiahSpecs().find(task); it != NiahSpecs().end()) {
    s = BuildNiah(task, it->second, size, r);
  } else if (task == "vt") {
    s = BuildVt(size, r);
  } else if (task == "cwe") {
    s = BuildCwe(size, r, length < 4096);
  } else if (task == "fwe") {
    s = BuildFwe(size, length, r);
  } else {
    throw std::invalid_argument("unknown RULER task '" + task + "' (qa_1/qa_2 are not built: their data is absent)");
  }
  s.task = task;
  s.index = index;
  s.max_new_tokens = RulerMaxNewTokens(task);
  return s;
}

int FindRulerSize(const std::string& task, int64_t length, int max_new_tokens, uint64_t seed,
                  const TokenCounter& count, int* probes) {
  const int64_t budget = length - max_new_tokens;
  int n_probes = 0;
  std::map<int, int64_t> cache;
  auto tokens = [&](int n) {
    if (auto it = cache.find(n); it != cache.end()) return it->second;
    ++n_probes;
    return cache[n] = count(BuildRuler(task, n, seed, 0, length));
  };
  // A linear guess from sizes 1 and 16 (tokens grow about linearly with the haystack), then a
  // bracket around it widened by doubling steps, then bisection: the largest size that fits,
  // in about half the counts of a search from 1 (each count is a prefill on the server).
  // Every unit (line, word, needle) costs at least about a token, so 2 x budget bounds the search;
  // without a bound a flat start (cwe has at least 10 words) would guess absurd sizes.
  const int cap = static_cast<int>(std::min<int64_t>(2 * budget + 16, 1 << 24));
  const int64_t t1 = tokens(1);
  if (t1 > budget) {  // even the smallest instance is too long: the caller skips the task
    if (probes) *probes = n_probes;
    return 0;
  }
  const int64_t t16 = tokens(16);
  const double per_unit = std::max(0.5, static_cast<double>(t16 - t1) / 15.0);
  int guess = static_cast<int>(std::clamp(1.0 + static_cast<double>(budget - t1) / per_unit, 1.0, double(cap)));
  int lo = 1, hi = 0;
  if (tokens(guess) <= budget) {
    lo = guess;
    for (int step = std::max(1, guess / 32);; step *= 2) {
      const int up = std::min(lo + step, cap);
      if (tokens(up) > budget) {
        hi = up;
        break;
      }
      lo = up;
      if (up == cap) {
        if (probes) *probes = n_probes;
        return lo;
      }
    }
  } else {
    hi = guess;
    for (int step = std::max(1, guess / 32);; step *= 2) {
      const int down = std::max(1, hi - step);
      if (tokens(down) <= budget) {
        lo = down;
        break;
      }
      hi = down;
    }
  }
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    (tokens(mid) <= budget ? lo : hi) = mid;
  }
  if (probes) *probes = n_probes;
  return lo;
}

}  // namespace defkv::eval
