"""A short soak (soak.py): mixed valid and invalid calls, cancellations and deadlines from several
clients against a server of its own, then its checks: one final status per call, metrics that add
up to what the server answered, memory back to idle. scripts/soak runs the same for minutes."""
import soak


def test_short_soak(bin_dir, model_dir, tmp_path):
    report, failures = soak.run(bin_dir, model_dir, seconds=20, clients=4, seed=1, workdir=tmp_path)
    print(report)
    assert not failures, report + "\n" + "\n".join(failures[:30])
