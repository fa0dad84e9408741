"""What a run reports about itself over a cohort (cohort-scaling audit): the time before the first case
in run.json, and the cases done so far beside the slice bar."""
import json
import time

from _infer_helpers import FAST, invoke_infer, make_model_set, make_scans, one_torch_thread


def test_run_json_counts_the_startup_and_the_bar_counts_cases(tmp_path, monkeypatch):
    import tqdm

    posts = []
    real = tqdm.tqdm

    class Recorder(real):
        def set_postfix_str(self, s="", refresh=True):
            posts.append(s)
            return super().set_postfix_str(s, refresh)

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    with one_torch_thread():
        models = make_model_set(tmp_path / "set", n_members=1)
        make_scans(tmp_path / "scans", n=3)
        t = time.perf_counter()
        res = invoke_infer([tmp_path / "scans", "-o", tmp_path / "out", "--models", models, *FAST])
        wall = time.perf_counter() - t
    assert res.exit_code == 0, res.output + res.stderr
    timings = json.loads((tmp_path / "out" / "run.json").read_text())["timings_s"]
    assert timings["startup_s"] > 0 and timings["startup_s"] + timings["total"] <= wall
    assert posts == ["cases 1/3", "cases 2/3", "cases 3/3"]
