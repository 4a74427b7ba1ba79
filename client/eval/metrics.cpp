#include "metrics.h"

#include <algorithm>
#include <cctype>
#include <cfenv>
#include <cmath>
#include <map>
#include <set>

namespace defkv::eval {
namespace {

// Python's str.isspace for ASCII, which includes the separators \x1c-\x1f. Text beyond ASCII is
// compared byte-wise: Unicode spaces and case folding are not reproduced (documented).
bool IsSpace(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

std::string Strip(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && IsSpace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && IsSpace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

std::string Lower(std::string s) {
  for (auto& c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

std::vector<std::string> SplitWhitespace(const std::string& s) {  // Python's str.split()
  std::vector<std::string> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && IsSpace(static_cast<unsigned char>(s[i]))) ++i;
    size_t j = i;
    while (j < s.size() && !IsSpace(static_cast<unsigned char>(s[j]))) ++j;
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

std::vector<std::string> SplitOn(const std::string& s, char sep) {  // Python's str.split(sep)
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t p = s.find(sep); p != std::string::npos; p = s.find(sep, start)) {
    out.push_back(s.substr(start, p - start));
    start = p + 1;
  }
  out.push_back(s.substr(start));
  return out;
}

std::string JoinWords(const std::vector<std::string>& v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? " " : "") + v[i];
  return out;
}

bool IsWordByte(unsigned char c) { return std::isalnum(c) || c == '_' || c >= 0x80; }

std::vector<std::string> Digits(const std::string& s) {  // re.findall(r"\d+", s)
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    if (std::isdigit(static_cast<unsigned char>(s[i]))) {
      size_t j = i;
      while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      out.push_back(s.substr(i, j - i));
      i = j;
    } else {
      ++i;
    }
  }
  return out;
}

double PyRound(double x) {  // Python's round(): halves go to even, like the default FE_TONEAREST
  std::fesetround(FE_TONEAREST);
  return std::nearbyint(x);
}

}  // namespace

std::string CleanPrediction(const std::string& prediction) {
  std::string s = Strip(prediction);
  for (auto& c : s)
    if (static_cast<unsigned char>(c) < 0x20) c = '\n';
  return Strip(s);
}

double StringMatchAll(const std::string& prediction, const std::vector<std::string>& references) {
  if (references.empty()) return 0.0;
  const std::string p = Lower(prediction);
  int found = 0;
  for (const auto& r : references) found += p.find(Lower(r)) != std::string::npos;
  return static_cast<double>(found) / static_cast<double>(references.size());
}

double StringMatchPart(const std::string& prediction, const std::vector<std::string>& references) {
  const std::string p = Lower(prediction);
  for (const auto& r : references)
    if (p.find(Lower(r)) != std::string::npos) return 1.0;
  return 0.0;
}

double RulerScore(const std::string& task, const std::string& prediction, const std::vector<std::string>& refs) {
  const std::string p = CleanPrediction(prediction);
  return task.rfind("qa", 0) == 0 ? StringMatchPart(p, refs) : StringMatchAll(p, refs);
}

std::string NormalizeAnswer(const std::string& s) {
  // Order as in LongBench: lower, remove punctuation, remove articles, fix whitespace.
  std::string t;
  for (char c : Lower(s))
    if (!std::ispunct(static_cast<unsigned char>(c))) t += c;  // string.punctuation is ASCII ispunct
  std::string u;
  for (size_t i = 0; i < t.size();) {
    bool replaced = false;
    if (i == 0 || !IsWordByte(static_cast<unsigned char>(t[i - 1]))) {
      for (const char* art : {"an", "a", "the"}) {  // \b(a|an|the)\b
        const size_t n = std::char_traits<char>::length(art);
        if (t.compare(i, n, art) == 0 && (i + n == t.size() || !IsWordByte(static_cast<unsigned char>(t[i + n])))) {
          u += ' ';
          i += n;
          replaced = true;
          break;
        }
      }
    }
    if (!replaced) u += t[i++];
  }
  return JoinWords(SplitWhitespace(u));
}

double QaF1(const std::string& prediction, const std::string& truth) {
  const auto p = SplitWhitespace(NormalizeAnswer(prediction));
  const auto g = SplitWhitespace(NormalizeAnswer(truth));
  std::map<std::string, int> cp, cg;
  for (const auto& w : p) ++cp[w];
  for (const auto& w : g) ++cg[w];
  int same = 0;
  for (const auto& [w, n] : cp)
    if (auto it = cg.find(w); it != cg.end()) same += std::min(n, it->second);
  if (same == 0) return 0.0;
  const double precision = static_cast<double>(same) / static_cast<double>(p.size());
  const double recall = static_cast<double>(same) / static_cast<double>(g.size());
  return 2 * precision * recall / (precision + recall);
}

double RougeL(const std::string& prediction, const std::string& truth) {
  // The `rouge` package (pltrdy, 1.0.1) that LongBench calls: sentences are split on '.', words
  // on single spaces after whitespace normalisation; with its default exclusive=True the word
  // counts and the union LCS are *sets* of words. Its errors (an empty side) score 0.
  auto sentences = [](const std::string& text) {
    std::vector<std::vector<std::string>> out;
    for (const auto& piece : SplitOn(text, '.'))
      if (!piece.empty()) out.push_back(SplitOn(JoinWords(SplitWhitespace(piece)), ' '));
    return out;
  };
  const auto hyp = sentences(prediction), ref = sentences(truth);
  if (hyp.empty() || ref.empty()) return 0.0;
  std::set<std::string> ref_words, hyp_words, lcs_union;
  for (const auto& s : ref) ref_words.insert(s.begin(), s.end());
  for (const auto& s : hyp) hyp_words.insert(s.begin(), s.end());
  for (const auto& r : ref) {
    for (const auto& h : hyp) {
      const size_t n = r.size(), m = h.size();
      std::vector<std::vector<int>> t(n + 1, std::vector<int>(m + 1, 0));
      for (size_t i = 1; i <= n; ++i)
        for (size_t j = 1; j <= m; ++j)
          t[i][j] = r[i - 1] == h[j - 1] ? t[i - 1][j - 1] + 1 : std::max(t[i - 1][j], t[i][j - 1]);
      // Read one LCS back with the package's tie rule (up only when strictly better).
      size_t i = n, j = m;
      while (i > 0 && j > 0) {
        if (r[i - 1] == h[j - 1]) {
          lcs_union.insert(r[i - 1]);
          --i, --j;
        } else if (t[i - 1][j] > t[i][j - 1]) {
          --i;
        } else {
          --j;
        }
      }
    }
  }
  const double llcs = static_cast<double>(lcs_union.size());
  const double r_lcs = llcs / static_cast<double>(ref_words.size());
  const double p_lcs = llcs / static_cast<double>(hyp_words.size());
  return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8));
}

double ClassificationScore(const std::string& prediction, const std::string& truth,
                           const std::vector<std::string>& all_classes) {
  std::vector<std::string> matches;
  for (const auto& c : all_classes)
    if (prediction.find(c) != std::string::npos) matches.push_back(c);
  // LongBench removes from the list while iterating over it, which skips the element after each
  // removal; the loop below does the same on purpose, so scores match the official ones.
  for (size_t i = 0; i < matches.size(); ++i)
    if (truth.find(matches[i]) != std::string::npos && matches[i] != truth) matches.erase(matches.begin() + static_cast<long>(i));
  if (std::find(matches.begin(), matches.end(), truth) == matches.end()) return 0.0;
  return 1.0 / static_cast<double>(matches.size());
}

double CountScore(const std::string& prediction, const std::string& truth) {
  const auto numbers = Digits(prediction);
  if (numbers.empty()) return 0.0;
  const auto right = std::count(numbers.begin(), numbers.end(), truth);
  return static_cast<double>(right) / static_cast<double>(numbers.size());
}

double RetrievalScore(const std::string& prediction, const std::string& truth) {
  const size_t p = truth.find("Paragraph ");
  std::string id;
  for (size_t q = p; q != std::string::npos; q = truth.find("Paragraph ", q + 1)) {  // first "Paragraph (\d+)"
    const auto d = Digits(truth.substr(q + 10, 1));
    if (!d.empty()) {
      id = Digits(truth.substr(q + 10))[0];
      break;
    }
  }
  if (id.empty()) return 0.0;  // no id in the ground truth: the official code would raise
  const auto numbers = Digits(prediction);
  if (numbers.empty()) return 0.0;
  const auto right = std::count(numbers.begin(), numbers.end(), id);
  return static_cast<double>(right) / static_cast<double>(numbers.size());
}

double CodeSimScore(const std::string& prediction, const std::string& truth) {
  // The first line without '`', '#' or '//' is the prediction.
  std::string pred_all = prediction;
  pred_all.erase(0, pred_all.find_first_not_of('\n') == std::string::npos ? pred_all.size() : pred_all.find_first_not_of('\n'));
  std::string pred;
  for (const auto& line : SplitOn(pred_all, '\n'))
    if (line.find('`') == std::string::npos && line.find('#') == std::string::npos && line.find("//") == std::string::npos) {
      pred = line;
      break;
    }
  // fuzz.ratio with python-Levenshtein: round(100 * (len_a + len_b - indel) / (len_a + len_b)),
  // where indel is the edit distance with substitutions costing 2. Byte-wise here.
  const size_t n = pred.size(), m = truth.size();
  if (n + m == 0) return 1.0;
  if (n == 0 || m == 0) return 0.0;
  std::vector<size_t> prev(m + 1), cur(m + 1);
  for (size_t j = 0; j <= m; ++j) prev[j] = j;
  for (size_t i = 1; i <= n; ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= m; ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (pred[i - 1] == truth[j - 1] ? 0 : 2)});
    std::swap(prev, cur);
  }
  const double ratio = static_cast<double>(n + m - prev[m]) / static_cast<double>(n + m);
  return PyRound(100.0 * ratio) / 100.0;
}

std::string LongBenchMetric(const std::string& dataset) {
  static const std::map<std::string, std::string> m = {
      {"narrativeqa", "qa_f1"}, {"qasper", "qa_f1"}, {"multifieldqa_en", "qa_f1"}, {"hotpotqa", "qa_f1"},
      {"2wikimqa", "qa_f1"}, {"musique", "qa_f1"}, {"triviaqa", "qa_f1"}, {"gov_report", "rouge"},
      {"qmsum", "rouge"}, {"multi_news", "rouge"}, {"samsum", "rouge"}, {"trec", "classification"},
      {"passage_count", "count"}, {"passage_retrieval_en", "retrieval"}, {"lcc", "code_sim"},
      {"repobench-p", "code_sim"}};
  auto it = m.find(dataset);
  return it == m.end() ? "" : it->second;
}

double LongBenchScore(const std::string& dataset, const std::string& prediction,
                      const std::vector<std::string>& answers, const std::vector<std::string>& all_classes) {
  std::string pred = prediction;
  if (dataset == "trec" || dataset == "triviaqa" || dataset == "samsum" || dataset == "lsht") {
    const size_t b = pred.find_first_not_of('\n');
    pred = b == std::string::npos ? "" : pred.substr(b);
    pred = pred.substr(0, pred.find('\n'));
  }
  const std::string metric = LongBenchMetric(dataset);
  double best = 0.0;
  for (const auto& a : answers) {
    double s = 0.0;
    if (metric == "qa_f1") s = QaF1(pred, a);
    else if (metric == "rouge") s = RougeL(pred, a);
    else if (metric == "classification") s = ClassificationScore(pred, a, all_classes);
    else if (metric == "count") s = CountScore(pred, a);
    else if (metric == "retrieval") s = RetrievalScore(pred, a);
    else if (metric == "code_sim") s = CodeSimScore(pred, a);
    best = std::max(best, s);
  }
  return best;
}

}  // namespace defkv::eval
