"""Records of older versions keep resuming; long case names get record names that fit (mutation audit 3)."""
import json
from test_resume import _recorded_case  # its helper


def test_overlay_max_at_its_default_leaves_the_options_and_their_digest_as_older_versions_wrote_them():
    """--overlay-max is left out of the options at its default (None), as --fast-kernels, --layout and
    --volume-index are: records made before it existed stay current, and their digest is unchanged."""
    import hashlib

    from condiff.engine.plan import RunOptions

    options = RunOptions(mask="auto", steps=4)
    assert "overlay_max" not in options.to_dict()
    older = {k: v for k, v in options.to_dict().items() if k != "nan_policy"}
    want = hashlib.sha256(json.dumps(older, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert options.case_digest(0, 1) == want
    assert RunOptions(mask="auto", steps=4, overlay_max=0.5).to_dict()["overlay_max"] == 0.5


def test_a_record_without_a_network_digest_still_proves_its_case(tmp_path):
    """Records written before the network digest was recorded cannot tell: they stay current; a record
    holding another network digest is recomputed."""
    from condiff.engine.plan import RunOptions, resume_check

    options = RunOptions(mask="auto", steps=4)
    plan = _recorded_case(tmp_path, options)
    same = dict(input_sha256="i" * 64, mask_sha256="m" * 64, model_set_digest="d" * 64, options=options)
    assert resume_check(tmp_path, plan, **same, network_digest="n" * 64) is None
    rec = json.loads((tmp_path / plan.record).read_text())
    (tmp_path / plan.record).write_text(json.dumps({**rec, "network_digest": "o" * 64}))
    assert resume_check(tmp_path, plan, **same, network_digest="n" * 64) == "network config changed"
    assert resume_check(tmp_path, plan, **same, network_digest="o" * 64) is None


def test_a_case_name_too_long_in_bytes_gets_a_record_name_that_fits():
    """The limit is 255 bytes, not characters: 130 two-byte characters (260 bytes + .json) are cut too."""
    import os

    from condiff.engine.plan import record_path

    rel = record_path("sub/" + "\u00e9" * 130)
    name = rel.rsplit("/", 1)[-1]
    assert rel.startswith("records/sub/") and name.endswith(".json") and "~" in name
    assert len(os.fsencode(name)) <= 255
    assert record_path("\u00e9" * 100) == "records/" + "\u00e9" * 100 + ".json"  # 205 bytes: kept whole
