"""The fingerprint file: round trip, digest, and refusal of anything modified or malformed."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepcore_auditor.adapters.base import InputConvention
from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.fingerprints.errors import FingerprintError
from deepcore_auditor.fingerprints.format import Fingerprint, ModelAnswers, load_fingerprint, save_fingerprint


def make(n: int = 5) -> Fingerprint:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=n).astype(np.float32)
    labels = probs.argmax(1).astype(np.int64)
    known = (ModelAnswers("cal-a", "independent", "same-arch", "calibration", labels[::-1].copy(), rng.random(n)),)
    return Fingerprint(rng.random((n, 1, 4, 4), dtype=np.float32), labels, probs, InputConvention(mean=(0.5,), std=(0.25,)),
                       ("a", "b", "c"), {"sha256": "00"}, {"name": "deepcore", "seed": 3}, known, "2026-11-29T00:00:00+00:00")


def test_round_trip_is_exact(tmp_path):
    fp = make()
    digest = save_fingerprint(fp, tmp_path / "f.json")
    back = load_fingerprint(tmp_path / "f.json")
    assert back.digest == digest == fp.digest
    assert np.array_equal(back.points, fp.points) and back.points.dtype == np.float32
    assert np.array_equal(back.known_models[0].labels, fp.known_models[0].labels)
    assert back.convention == fp.convention and back.classes == fp.classes


@pytest.mark.parametrize("edit", [
    lambda c: c["method"].__setitem__("seed", 4),
    lambda c: c["owner_labels"].__setitem__("base64", c["owner_labels"]["base64"][::-1]),
    lambda c: c["known_models"][0].__setitem__("kind", "piracy"),
    lambda c: c["convention"].__setitem__("std", [0.3]),
])
def test_any_modification_is_refused(tmp_path, edit):
    save_fingerprint(make(), tmp_path / "f.json")
    doc = json.loads((tmp_path / "f.json").read_text())
    edit(doc["content"])
    (tmp_path / "f.json").write_text(json.dumps(doc))
    with pytest.raises(FingerprintError, match="does not match"):
        load_fingerprint(tmp_path / "f.json")


def test_other_versions_and_files_are_refused(tmp_path):
    save_fingerprint(make(), tmp_path / "f.json")
    doc = json.loads((tmp_path / "f.json").read_text())
    doc["version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(doc))
    with pytest.raises(FingerprintError, match="version 99"):
        load_fingerprint(tmp_path / "v.json")
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(FingerprintError, match="not a DeepCore fingerprint"):
        load_fingerprint(tmp_path / "x.json")
    with pytest.raises(InputError, match="not found"):
        load_fingerprint(tmp_path / "missing.json")


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.__setitem__("note", "x"), "envelope field no fingerprint file carries (note)"),
    (lambda d: d.__setitem__("signature", None), "signature: null"),
    (lambda d: d.__setitem__("version", True), "format version True"),
])
def test_nothing_outside_the_digest_but_the_envelope_is_accepted(tmp_path, edit, words):
    """Found by the soak fuzzer: a fingerprint with an extra top-level field loaded, though what
    it said was covered by no digest; `true` passed for version 1 (True == 1 in Python)."""
    save_fingerprint(make(), tmp_path / "f.json")
    doc = json.loads((tmp_path / "f.json").read_text())
    edit(doc)
    (tmp_path / "f.json").write_text(json.dumps(doc))
    with pytest.raises(FingerprintError, match=re.escape(words)):
        load_fingerprint(tmp_path / "f.json")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    save_fingerprint(make(), tmp_path / "f.json")
    save_fingerprint(make(7), tmp_path / "f.json")
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    assert len(load_fingerprint(tmp_path / "f.json")) == 7


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_raise_only_the_projects_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "f.json"
    path.write_bytes(blob)
    with pytest.raises(FingerprintError):
        load_fingerprint(path)


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12))
def test_well_digested_garbage_content_raises_only_the_projects_error(tmp_path_factory, content):
    from deepcore_auditor.fingerprints.format import FORMAT_NAME, FORMAT_VERSION, canonical_digest

    path = tmp_path_factory.mktemp("fuzz") / "f.json"
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "content": content}
    doc["content_sha256"] = canonical_digest(content) if isinstance(content, dict) else "x"
    path.write_text(json.dumps(doc))
    with pytest.raises(FingerprintError):
        load_fingerprint(path)


def test_content_that_does_not_re_encode_to_itself_is_refused(tmp_path):
    """Known models' labels stored as floats keep the same parsed fingerprint but change what
    calibration compares: a file whose content is not canonical could share another's identity."""
    from deepcore_auditor.fingerprints.format import canonical_digest, decode_array, encode_array

    save_fingerprint(make(), tmp_path / "f.json")
    doc = json.loads((tmp_path / "f.json").read_text())
    m = doc["content"]["known_models"][0]
    m["labels"] = encode_array(decode_array(m["labels"], "labels").astype(np.float64) + 0.5)
    doc["content_sha256"] = canonical_digest(doc["content"])
    (tmp_path / "g.json").write_text(json.dumps(doc))
    with pytest.raises(FingerprintError, match="canonical form"):
        load_fingerprint(tmp_path / "g.json")


def test_a_point_listed_twice_and_ambiguous_json_are_refused(tmp_path):
    fp = make()
    points = fp.points.copy()
    points[1] = points[0]
    save_fingerprint(Fingerprint(points, fp.owner_labels, fp.owner_probs, fp.convention, fp.classes, fp.owner_identity, fp.method, fp.known_models, fp.created), tmp_path / "d.json")
    with pytest.raises(FingerprintError, match="twice"):
        load_fingerprint(tmp_path / "d.json")
    save_fingerprint(make(), tmp_path / "f.json")
    text = (tmp_path / "f.json").read_text()
    (tmp_path / "dup.json").write_text(text[:-1] + ',"content_sha256":"0"}')  # a second value for one key
    with pytest.raises(FingerprintError, match="not valid JSON"):
        load_fingerprint(tmp_path / "dup.json")
    assert oct((tmp_path / "f.json").stat().st_mode & 0o777) != oct(0o600)  # published files are not private
