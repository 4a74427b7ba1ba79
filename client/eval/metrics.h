// Scorers: RULER's string_match_all / string_match_part and the LongBench metrics.
// Scores are fractions in [0, 1]; tables multiply by 100.
#pragma once

#include <string>
#include <vector>

namespace defkv::eval {

// RULER/kvpress prediction cleaning: strip, replace control characters [\x00-\x1f] by '\n', strip.
std::string CleanPrediction(const std::string& prediction);

// Fraction of references found (case-insensitively) in the prediction (niah, vt, cwe, fwe).
double StringMatchAll(const std::string& prediction, const std::vector<std::string>& references);
// 1 if any reference is found (case-insensitively), else 0 (RULER's qa tasks).
double StringMatchPart(const std::string& prediction, const std::vector<std::string>& references);
// The RULER score of one sample: string_match_part for qa_*, string_match_all otherwise (cleans).
double RulerScore(const std::string& task, const std::string& prediction, const std::vector<std::string>& refs);

// LongBench (THUDM/LongBench metrics.py), each against one ground truth.
std::string NormalizeAnswer(const std::string& s);  // lower, drop punctuation, articles, extra spaces
double QaF1(const std::string& prediction, const std::string& truth);
double RougeL(const std::string& prediction, const std::string& truth);  // the `rouge` package's rouge-l f
double ClassificationScore(const std::string& prediction, const std::string& truth,
                           const std::vector<std::string>& all_classes);
double CountScore(const std::string& prediction, const std::string& truth);
double RetrievalScore(const std::string& prediction, const std::string& truth);
double CodeSimScore(const std::string& prediction, const std::string& truth);

// The metric LongBench uses for a dataset ("qa_f1", "rouge", "classification", "count",
// "retrieval", "code_sim"); empty when the dataset is unknown or needs a metric not implemented
// here (the Chinese datasets: qa_f1_zh, rouge_zh).
std::string LongBenchMetric(const std::string& dataset);
// LongBench's per-sample score: first line only for trec/triviaqa/samsum/lsht, then the max over
// the ground truths.
double LongBenchScore(const std::string& dataset, const std::string& prediction,
                      const std::vector<std::string>& answers, const std::vector<std::string>& all_classes);

}  // namespace defkv::eval
