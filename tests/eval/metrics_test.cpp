// Scorers against values worked out by hand or computed with the reference Python code
// (LongBench metrics.py with the `rouge` 1.0.1 package).
#include <gtest/gtest.h>

#include "metrics.h"
#include "report.h"

namespace ev = defkv::eval;

TEST(RulerMetrics, CleaningAndStringMatch) {
  EXPECT_EQ(ev::CleanPrediction("  1234567\x01 and\t7654321 \n"), "1234567\n and\n7654321");
  EXPECT_DOUBLE_EQ(ev::StringMatchAll("The numbers are 1234567 and 7654321.", {"1234567", "7654321"}), 1.0);
  EXPECT_DOUBLE_EQ(ev::StringMatchAll("only 1234567", {"1234567", "7654321", "1111111", "2222222"}), 0.25);
  EXPECT_DOUBLE_EQ(ev::StringMatchAll("ABCDE fghij", {"abcde", "FGHIJ"}), 1.0) << "case-insensitive";
  EXPECT_DOUBLE_EQ(ev::StringMatchPart("Paris", {"London", "paris"}), 1.0);
  EXPECT_DOUBLE_EQ(ev::StringMatchPart("Rome", {"London", "Paris"}), 0.0);
  EXPECT_DOUBLE_EQ(ev::RulerScore("qa_1", "it is paris", {"Paris", "Lyon"}), 1.0) << "qa: any reference";
  EXPECT_DOUBLE_EQ(ev::RulerScore("vt", "AAAAA BBBBB", {"AAAAA", "BBBBB", "CCCCC", "DDDDD", "EEEEE"}), 0.4);
}

TEST(LongBenchMetrics, NormalizeAndQaF1) {
  EXPECT_EQ(ev::NormalizeAnswer("The Quick, brown fox -- an Apple a day!"), "quick brown fox apple day");
  EXPECT_NEAR(ev::QaF1("The cat sat on the mat.", "a cat on a mat"), 0.8571428571428571, 1e-12);
  EXPECT_NEAR(ev::QaF1("Paris, France", "Paris"), 2.0 / 3.0, 1e-12);
  EXPECT_DOUBLE_EQ(ev::QaF1("nothing", "Paris"), 0.0);
  EXPECT_DOUBLE_EQ(ev::QaF1("Theatre", "theatre"), 1.0) << "'the' only as a whole word";
}

TEST(LongBenchMetrics, RougeLMatchesThePackage) {
  EXPECT_NEAR(ev::RougeL("the cat sat on the mat. it was happy.", "the cat was on the mat. the cat was happy."),
              0.8571428522448981, 1e-12);
  EXPECT_NEAR(ev::RougeL("a b c d e", "a c e b d"), 0.5999999950000001, 1e-12);
  EXPECT_NEAR(ev::RougeL("police killed the gunman", "police kill the gunman"), 0.749999995, 1e-12);
  EXPECT_DOUBLE_EQ(ev::RougeL("", "a b"), 0.0);
}

TEST(LongBenchMetrics, ClassificationCountRetrievalCode) {
  EXPECT_DOUBLE_EQ(ev::ClassificationScore("Location and Number", "Location", {"Location", "Number", "Loc"}), 0.5);
  EXPECT_DOUBLE_EQ(ev::ClassificationScore("Human being or Human", "Human", {"Human being", "Human", "Abbreviation"}), 0.5);
  EXPECT_DOUBLE_EQ(ev::ClassificationScore("Abbreviation", "Human", {"Human being", "Human", "Abbreviation"}), 0.0);
  EXPECT_DOUBLE_EQ(ev::CountScore("There are 12 unique paragraphs", "12"), 1.0);
  EXPECT_DOUBLE_EQ(ev::CountScore("12 or 13", "12"), 0.5);
  EXPECT_DOUBLE_EQ(ev::CountScore("twelve", "12"), 0.0);
  EXPECT_DOUBLE_EQ(ev::RetrievalScore("Paragraph 7", "Paragraph 7"), 1.0);
  EXPECT_DOUBLE_EQ(ev::RetrievalScore("Paragraph 7 or Paragraph 3", "Paragraph 7"), 0.5);
  EXPECT_DOUBLE_EQ(ev::RetrievalScore("none", "Paragraph 7"), 0.0);
  EXPECT_DOUBLE_EQ(ev::CodeSimScore("int x = 1;", "int y = 1;"), 0.9);
  EXPECT_DOUBLE_EQ(ev::CodeSimScore("\n# comment\nreturn a;", "return a;"), 1.0) << "first line without a comment";
}

TEST(LongBenchMetrics, DatasetScoreTakesFirstLineAndBestAnswer) {
  EXPECT_DOUBLE_EQ(ev::LongBenchScore("triviaqa", "\nParis\nLondon", {"London", "Paris"}, {}), 1.0);
  EXPECT_DOUBLE_EQ(ev::LongBenchScore("triviaqa", "Rome\nParis", {"Paris"}, {}), 0.0) << "only the first line";
  EXPECT_DOUBLE_EQ(ev::LongBenchScore("hotpotqa", "Rome\nParis", {"Paris"}, {}), 2.0 / 3.0) << "qa_f1 scores the whole text";
  EXPECT_EQ(ev::LongBenchMetric("dureader"), "") << "Chinese metrics are not implemented";
}

TEST(Report, CsvRoundTripAndTable) {
  ev::Result a;
  a.suite = "ruler", a.task = "niah_single_1", a.index = 0, a.length = 4096, a.seed = 42, a.press = "snapkv";
  a.ratio = 0.8, a.ok = true, a.score = 1.0, a.prediction = "say \"1234567\",\nthen stop", a.answers = {"1234567"};
  ev::Result b = a;
  b.task = "vt", b.score = 0.4, b.prediction = "x";
  ev::Result c = a;
  c.index = 1, c.ok = false, c.error = "code 11: too long";
  const std::string csv = ev::CsvHeader() + ev::ToCsvRow(a) + ev::ToCsvRow(b) + ev::ToCsvRow(c);
  const auto rows = ev::ParseCsv(csv);
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_EQ(rows[1][8], a.prediction);
  const auto md = ev::MarkdownTable({a, b, c}, {"niah_single_1", "qa_1", "vt"}, "t");
  EXPECT_NE(md.find("| snapkv | 4096 | 0.80 | 20% | 100.00 | – | 40.00 | **70.00** | 2 | 1 |"), std::string::npos) << md;
  EXPECT_EQ(ev::ResultKey(a), ev::ResultKey("ruler", "niah_single_1", 0, 4096, 42, "snapkv", 0.8));
}
