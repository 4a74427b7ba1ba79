// The LongBench-format loader and prompts, on a small synthetic jsonl file.
#include <gtest/gtest.h>

#include <fstream>

#include "longbench.h"
#include "metrics.h"

namespace ev = defkv::eval;

TEST(LongBench, LoadsRowsAndBuildsOfficialPrompts) {
  const auto rows = ev::LoadLongBench(std::string(DEFKV_EVAL_TESTDATA) + "/longbench_tiny.jsonl");
  ASSERT_EQ(rows.size(), 6u);
  EXPECT_EQ(rows[0].dataset, "hotpotqa");
  EXPECT_EQ(rows[0].id, "hp-1");
  EXPECT_EQ(rows[1].answers, (std::vector<std::string>{"red", "it was red"}));
  EXPECT_EQ(rows[2].all_classes.size(), 4u);

  const auto hp = ev::BuildLongBench(rows[0], 0);
  EXPECT_EQ(hp.context, "Answer the question based on the given passages. Only give me the answer and do not output any "
                        "other words.\n\nThe following are given passages.\n" + rows[0].context);
  EXPECT_EQ(hp.question, "\n\nAnswer the question based on the given passages. Only give me the answer and do not "
                         "output any other words.\n\nQuestion: Where did Lily find the ball?\nAnswer:");
  EXPECT_EQ(hp.max_new_tokens, 32);
  EXPECT_TRUE(hp.use_chat_template);

  const auto trec = ev::BuildLongBench(rows[2], 2);
  EXPECT_FALSE(trec.use_chat_template) << "trec is a raw completion";
  EXPECT_EQ(trec.question, "\nWho is the king of the hill?");
  EXPECT_DOUBLE_EQ(ev::LongBenchScore("trec", "Individual\nCity", trec.answers, trec.all_classes), 1.0);

  const auto pr = ev::BuildLongBench(rows[4], 4);
  EXPECT_NE(pr.question.find("The answer is: "), std::string::npos);
  EXPECT_DOUBLE_EQ(ev::LongBenchScore("passage_retrieval_en", "Paragraph 2", pr.answers, {}), 1.0);
  EXPECT_DOUBLE_EQ(ev::LongBenchScore("passage_count", "2", rows[3].answers, {}), 1.0);
  EXPECT_GT(ev::LongBenchScore("gov_report", "The budget grew.", rows[5].answers, {}), 0.5);
}

TEST(LongBench, DatasetFromFileNameAndBadRows) {
  const std::string dir = ::testing::TempDir();
  {
    std::ofstream f(dir + "/samsum_e.jsonl");
    f << R"({"input": "Dialogue: A: hi", "context": "Dialogue: B: yo\nSummary: B greets.", "answers": ["A greets."]})" << "\n";
  }
  const auto rows = ev::LoadLongBench(dir + "/samsum_e.jsonl");
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].dataset, "samsum");
  const auto s = ev::BuildLongBench(rows[0], 0);
  EXPECT_EQ(s.stop, (std::vector<std::string>{"\n"}));
  {
    std::ofstream f(dir + "/broken.jsonl");
    f << "{\"input\": \"x\"}\n";
  }
  EXPECT_THROW(ev::LoadLongBench(dir + "/broken.jsonl"), std::runtime_error);
  ev::LongBenchRow zh{"dureader", "1", "c", "q", {"a"}, {}};
  EXPECT_THROW(ev::BuildLongBench(zh, 0), std::invalid_argument);
}
