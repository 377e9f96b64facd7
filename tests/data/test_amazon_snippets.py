"""The vendored Amazon snippets: counts of the file as shipped, labels by the sign of the mean
rating, the checksum guard."""

import pytest

from flywheel.datasets import amazon_snippets
from flywheel.datasets.amazon_snippets import DatasetError, read_amazon_snippets


def test_the_vendored_file_reads_with_labels_by_sign_and_zeros_dropped():
    frame = read_amazon_snippets("pos", "neg")
    # facts of the vendored file (see flywheel/datasets/vader_amazon/README.md)
    assert len(frame) == 3610
    assert frame["label"].value_counts().to_dict() == {"pos": 2128, "neg": 1482}
    assert (frame.loc[frame["label"] == "pos", "rating"] > 0).all()
    assert (frame.loc[frame["label"] == "neg", "rating"] < 0).all()
    assert frame["origin"].is_unique and frame["origin"].iloc[0] == "amazon_snippets:1"
    assert frame["text"].iloc[0] == "troubleshooting ad-2500 and ad-2600 no picture scrolling b/w."
    assert not frame["text"].str.contains("\r").any()


def test_labels_take_the_models_names():
    frame = read_amazon_snippets("fresh", "rotten")
    assert set(frame["label"]) == {"fresh", "rotten"}


def test_a_damaged_file_is_refused(monkeypatch):
    monkeypatch.setattr(amazon_snippets, "SHA256", "0" * 64)
    with pytest.raises(DatasetError, match="checksum mismatch"):
        read_amazon_snippets("pos", "neg")
