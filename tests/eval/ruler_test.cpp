// The RULER-style generators: determinism by seed, needles exactly as specified, sizing.
#include <gtest/gtest.h>

#include <algorithm>
#include <regex>
#include <set>

#include "metrics.h"
#include "ruler.h"

namespace ev = defkv::eval;

namespace {

// A stand-in for the server's tokenizer: about four characters a token.
int64_t FourCharsPerToken(const ev::Sample& s) {
  return static_cast<int64_t>((s.context.size() + s.question.size() + s.answer_prefix.size() + 3) / 4);
}

std::string Prompt(const ev::Sample& s) { return s.context + s.question + s.answer_prefix; }

}  // namespace

TEST(Ruler, SameSeedSameSamplesOtherSeedOtherSamples) {
  for (const auto& task : ev::RulerTasks()) {
    const auto a = ev::BuildRuler(task, 40, 7, 3, 4096), b = ev::BuildRuler(task, 40, 7, 3, 4096);
    EXPECT_EQ(Prompt(a), Prompt(b)) << task;
    EXPECT_EQ(a.answers, b.answers) << task;
    const auto c = ev::BuildRuler(task, 40, 8, 3, 4096), d = ev::BuildRuler(task, 40, 7, 4, 4096);
    EXPECT_NE(Prompt(a), Prompt(c)) << task << ": the seed must matter";
    EXPECT_NE(Prompt(a), Prompt(d)) << task << ": the index must matter";
  }
}

TEST(Ruler, RngIsPinned) {
  // The generator is ours, not std::'s, so a seed means the same tasks on every platform.
  ev::Rng r(42);
  EXPECT_EQ(r.Next(), 0xBDD732262FEB6E95ULL);
  ev::Rng u(1);
  for (int i = 0; i < 1000; ++i) {
    const auto v = u.Uniform(3, 9);
    ASSERT_GE(v, 3);
    ASSERT_LE(v, 9);
  }
}

TEST(Ruler, SamplesDoNotDependOnWhatWasBuiltBefore) {
  // Word pools grow on demand; a sample must come out the same whatever was built earlier.
  const auto before = ev::BuildRuler("cwe", 40, 5, 0, 4096);
  (void)ev::BuildRuler("cwe", 3000, 5, 1, 4096);  // grows the pool with made-up words
  const auto after = ev::BuildRuler("cwe", 40, 5, 0, 4096);
  EXPECT_EQ(before.context, after.context);
}

TEST(Ruler, SingleNeedleAppearsExactlyOnceWithItsAnswer) {
  for (const std::string task : {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_2", "niah_multikey_3"}) {
    for (int i = 0; i < 5; ++i) {
      const auto s = ev::BuildRuler(task, 60, 42, i, 4096);
      ASSERT_EQ(s.answers.size(), 1u) << task;
      const std::string value = s.answers[0];
      EXPECT_EQ(ev::CountOccurrences(s.context, value), 1) << task << " #" << i;
      // The queried key is named in the question, and its needle is in the context exactly once.
      const std::regex q("for (.+) mentioned in the provided text\\?");
      std::smatch m;
      ASSERT_TRUE(std::regex_search(s.question, m, q)) << s.question;
      const std::string needle = "One of the special magic " + std::string(task == "niah_multikey_3" || task == "niah_single_3" ? "uuid" : "number") +
                                 " for " + m[1].str() + " is: " + value + ".";
      EXPECT_EQ(ev::CountOccurrences(s.context, needle), 1) << task << ": " << needle;
      EXPECT_EQ(ev::CountOccurrences(s.context, " for " + m[1].str() + " is: "), 1) << "the key must be unique";
      EXPECT_EQ(s.question.find(value), std::string::npos) << "the question must not give the answer away";
      EXPECT_EQ(s.context.find("What is the special magic"), std::string::npos) << "the question is never in the context";
    }
  }
}

TEST(Ruler, SingularAndPluralTemplates) {
  const auto one = ev::BuildRuler("niah_single_1", 10, 1, 0, 4096);
  EXPECT_EQ(one.context.rfind("A special magic number is hidden within the following text.", 0), 0u) << one.context;
  EXPECT_EQ(one.question.rfind("What is the special magic number for ", 0), 0u) << one.question;
  EXPECT_EQ(one.answer_prefix.rfind(" The special magic number for ", 0), 0u);
  EXPECT_NE(one.answer_prefix.find("mentioned in the provided text is"), std::string::npos);
  const auto many = ev::BuildRuler("niah_multivalue", 200, 1, 0, 4096);
  EXPECT_EQ(many.context.rfind("Some special magic numbers are hidden within the following text.", 0), 0u);
  EXPECT_EQ(many.question.rfind("What are all the special magic numbers for ", 0), 0u) << many.question;
}

TEST(Ruler, MultiValueMultiKeyMultiQuery) {
  const auto mv = ev::BuildRuler("niah_multivalue", 300, 3, 0, 4096);
  ASSERT_EQ(mv.answers.size(), 4u);
  for (const auto& v : mv.answers) EXPECT_EQ(ev::CountOccurrences(mv.context, v), 1) << v;
  EXPECT_EQ(ev::CountOccurrences(mv.context, "One of the special magic numbers for "), 4);

  const auto mk = ev::BuildRuler("niah_multikey_1", 300, 3, 0, 4096);
  ASSERT_EQ(mk.answers.size(), 1u);
  EXPECT_EQ(ev::CountOccurrences(mk.context, "One of the special magic number for "), 4) << "1 real + 3 distractors";

  const auto mq = ev::BuildRuler("niah_multiquery", 300, 3, 0, 4096);
  ASSERT_EQ(mq.answers.size(), 4u);
  EXPECT_EQ(ev::CountOccurrences(mq.context, "One of the special magic numbers for "), 4);
  EXPECT_NE(mq.question.find(", and "), std::string::npos) << mq.question;
  for (const auto& v : mq.answers) EXPECT_EQ(ev::CountOccurrences(mq.context, v), 1);

  const auto mk2 = ev::BuildRuler("niah_multikey_2", 50, 3, 0, 4096);
  EXPECT_EQ(ev::CountOccurrences(mk2.context, "One of the special magic number for "), 51) << "every line is a needle";
}

TEST(Ruler, NoiseHaystackHasTheRequestedLines) {
  const auto s = ev::BuildRuler("niah_single_1", 25, 5, 0, 4096);
  EXPECT_EQ(ev::CountOccurrences(s.context, ev::kNoiseSentence), 25);
}

TEST(Ruler, EssayIsFixedTextAndNeedleSitsBetweenSentences) {
  EXPECT_EQ(ev::EssayWords(50), ev::EssayWords(50));
  EXPECT_EQ(ev::EssayWords(80).rfind(ev::EssayWords(40), 0), 0u) << "a longer haystack extends a shorter one";
  const auto s = ev::BuildRuler("niah_single_2", 400, 9, 0, 4096);
  const auto sents = ev::SplitSentences(s.context);
  int needles = 0;
  for (const auto& x : sents) needles += x.rfind("One of the special magic number for ", 0) == 0;
  EXPECT_EQ(needles, 1);
}

TEST(Ruler, VariableTracking) {
  const auto s = ev::BuildRuler("vt", 40, 11, 0, 4096);
  ASSERT_EQ(s.answers.size(), 5u);
  const std::regex value("value (\\d{5}) in the text above");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(s.question, m, value)) << s.question;
  EXPECT_EQ(ev::CountOccurrences(s.context, "VAR " + s.answers[0] + " = " + m[1].str()), 1);
  for (size_t i = 1; i < 5; ++i)
    EXPECT_EQ(ev::CountOccurrences(s.context, "VAR " + s.answers[i] + " = VAR " + s.answers[i - 1] + " "), 1) << i;
  // The chain is in order: each hop after the one it copies.
  size_t pos = 0;
  for (const auto& v : s.answers) {
    const size_t p = s.context.find("VAR " + v + " =", pos);
    ASSERT_NE(p, std::string::npos);
    pos = p;
  }
  EXPECT_NE(s.context.find("Question: Find all variables"), std::string::npos) << "the in-context example";
}

TEST(Ruler, CommonWords) {
  const auto s = ev::BuildRuler("cwe", 60, 2, 0, 4096);
  ASSERT_EQ(s.answers.size(), 10u);
  const size_t list = s.context.rfind("Memorize the ones that appear most often.\n");
  std::string main_list = s.context.substr(list);
  std::replace(main_list.begin(), main_list.end(), '\n', ' ');  // the last item ends the line
  for (const auto& w : s.answers) EXPECT_EQ(ev::CountOccurrences(main_list, ". " + w + " "), 30) << w;
  const auto short_ctx = ev::BuildRuler("cwe", 60, 2, 0, 2048);
  std::string l2 = short_ctx.context.substr(short_ctx.context.rfind("most often.\n"));
  std::replace(l2.begin(), l2.end(), '\n', ' ');
  for (const auto& w : short_ctx.answers) EXPECT_EQ(ev::CountOccurrences(l2, ". " + w + " "), 6) << w;
}

TEST(Ruler, FrequentWordsFollowZipf) {
  const auto s = ev::BuildRuler("fwe", 2000, 4, 0, 4096);
  ASSERT_EQ(s.answers.size(), 3u);
  const double z = 3.14159265358979 * 3.14159265358979 / 6;
  for (int rank = 2; rank <= 4; ++rank)
    EXPECT_EQ(ev::CountOccurrences(s.context, " " + s.answers[rank - 2]), static_cast<int>(2000.0 / (rank * rank) / z))
        << "rank " << rank;
  EXPECT_GT(ev::CountOccurrences(s.context, "..."), 0) << "rank 1 is dots";
}

TEST(Ruler, SizingFitsTheBudget) {
  for (const auto& task : ev::RulerTasks()) {
    int probes = 0;
    const int n = ev::FindRulerSize(task, 1024, 32, 42, FourCharsPerToken, &probes);
    const auto fits = ev::BuildRuler(task, n, 42, 0, 1024), over = ev::BuildRuler(task, n + 1, 42, 0, 1024);
    EXPECT_LE(FourCharsPerToken(fits) + 32, 1024) << task;
    EXPECT_GT(FourCharsPerToken(over) + 32, 1024) << task << ": the largest size that fits";
    EXPECT_LT(probes, 40) << task;
  }
}

TEST(Ruler, AnswersScoreFullMarks) {
  for (const auto& task : ev::RulerTasks()) {
    const auto s = ev::BuildRuler(task, 30, 42, 0, 4096);
    std::string all;
    for (const auto& a : s.answers) all += a + ", ";
    EXPECT_DOUBLE_EQ(ev::RulerScore(task, all, s.answers), 1.0) << task;
    EXPECT_DOUBLE_EQ(ev::RulerScore(task, "no idea", s.answers), 0.0) << task;
  }
}

TEST(Ruler, SizingSaysWhenNothingFits) {
  EXPECT_EQ(ev::FindRulerSize("cwe", 100, 32, 42, FourCharsPerToken), 0);
}

TEST(Ruler, UnknownAndAbsentTasksAreRefused) {
  EXPECT_THROW(ev::BuildRuler("qa_1", 10, 1, 0, 4096), std::invalid_argument);
  EXPECT_FALSE(ev::IsRulerTask("qa_2"));
}
