"""Training data: every record kind, bad records counted, the blend, truncation, padding and packing."""

import json
from collections import Counter

import pytest
import torch
from PIL import Image as PILImage

from sparkles.config import DataSource
from sparkles.errors import InputError
from sparkles.processor import IGNORE, Rendered
from sparkles.train.data import BlendSampler, Item, TrainDataset, collate, collate_packed, truncate
from sparkles.train.records import read_source


def dialogue(ids, answer="Fine."):
    return {"dialogue": [
        {"role": "user", "content": f"Compare IMAGE#{ids[0]}<Img><ImageHere></Img> with IMAGE#{ids[1]}"
                                    "<Img><ImageHere></Img>.", "images": [{"image_id": ids[0]}, {"image_id": ids[1]}]},
        {"role": "assistant", "content": f"IMAGE#{ids[0]} is red."},
        {"role": "user", "content": f"And IMAGE#{ids[2]}<Img><ImageHere></Img>?", "images": [{"image_id": ids[2]}]},
        {"role": "assistant", "content": answer}]}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a", "b", "c", "w7-001"):
        PILImage.new("RGB", (20, 20), "red").save(tmp_path / "images" / f"{name}.png")
    return tmp_path


def write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return str(path)


def test_sparkles_dialogues_give_one_sample_per_turn_or_one_per_dialogue(folder):
    path = write(folder / "d.json", [dialogue(["a", "b", "c"]), dialogue(["a", "w7-001", "c"])])
    samples, report = read_source(DataSource(path, images=str(folder / "images")))
    assert (report.records, report.samples, len(samples)) == (2, 4, 4)
    assert [len(s.conversation) for s in samples] == [2, 4, 2, 4] and {s.loss_on for s in samples} == {"last"}
    assert samples[0].conversation.slots[0].source == str(folder / "images" / "a.png")
    whole, _ = read_source(DataSource(path, images=str(folder / "images"), loss_on="all"))
    assert [len(s.conversation) for s in whole] == [4, 4] and whole[0].loss_on == "all"


def test_bad_records_are_skipped_counted_and_named_or_fatal_when_strict(folder):
    records = [dialogue(["a", "b", "c"]), dialogue(["a", "zzz", "c"]), {"dialogue": "nope"},
               {"dialogue": [{"role": "assistant", "content": "hi"}]}]
    path = write(folder / "d.json", records)
    samples, report = read_source(DataSource(path, images=str(folder / "images")))
    assert len(samples) == 2 and sum(report.skipped.values()) == 3
    assert "d.json#1: image not found" in report.summary()
    with pytest.raises(InputError, match="d.json#1: image not found"):
        read_source(DataSource(path, images=str(folder / "images")), strict=True)
    broken = folder / "d.jsonl"
    broken.write_text(json.dumps(dialogue(["a", "b", "c"])) + "\n{not json\n")
    samples, report = read_source(DataSource(str(broken), images=str(folder / "images")))
    assert len(samples) == 2 and "d.jsonl#1: line 2 is not valid JSON" in report.summary()


def test_every_record_kind_is_read(folder):
    images = str(folder / "images")
    turns = {"uniform_question": "x", "answer": "It is red.", "tgt_imgs": [{"image_id": "a"}, {"image_id": "b"}],
             "instruction": "###Human: Is IMAGE#a<Img><ImageHere></Img> like IMAGE#b<Img><ImageHere></Img>?"
                            "###Assistant: "}
    llava = {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                            {"from": "gpt", "value": "Red."}]}
    caption = {"image_id": "a", "caption": "A red square."}
    text = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    ours = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "b.png"}},
                                                      {"type": "text", "text": "Colour?"}]},
                         {"role": "assistant", "content": "Red."}]}
    for record, kind, slots in ((turns, "sparkles_turns", 2), (llava, "llava", 1), (caption, "captions", 1),
                                (text, "text", 0), (ours, "jsonl", 1)):
        samples, report = read_source(DataSource(write(folder / f"{kind}.jsonl", [record], jsonl=True),
                                                 images=images))
        assert report.samples == 1, (kind, report.summary())
        assert len(samples[0].conversation.slots) == slots
        assert samples[0].conversation[-1].role == "assistant"


def test_truncation_never_cuts_an_image_and_drops_samples_with_nothing_to_learn():
    r = Rendered(list(range(20)), [IGNORE] * 12 + list(range(12, 20)), image_starts=[2, 8])
    cut = truncate(r, 15, tokens_per_image=4)
    assert len(cut) == 15 and cut.image_starts == [2, 8]
    inside = truncate(r, 10, tokens_per_image=4)  # 10 falls inside the image at 8..11: cut before it
    assert inside is None  # and then no supervised token is left
    r2 = Rendered(list(range(20)), [IGNORE] * 2 + list(range(2, 20)), image_starts=[8])
    assert truncate(r2, 10, tokens_per_image=4).input_ids == list(range(8))
    # An image that takes more than tokens_per_image positions (tiles): a cut inside any of them moves before it.
    assert truncate(r2, 14, tokens_per_image=4, span=lambda start: 9).input_ids == list(range(8))
    assert len(truncate(r2, 14, tokens_per_image=4)) == 14  # 14 is past a 4-token image at 8..11


def test_the_blend_follows_ratios_is_deterministic_and_resumes_anywhere():
    def take(sampler, n):
        out = []
        for batch in sampler:
            out.append(batch)
            if len(out) == n:
                return out

    full = take(BlendSampler([30, 10], [2, 1], batch_size=6, seed=3), 200)
    counts = Counter(s for batch in full for s, _ in batch)
    assert abs(counts[0] / (counts[0] + counts[1]) - 2 / 3) < 0.05
    assert full == take(BlendSampler([30, 10], [2, 1], batch_size=6, seed=3), 200)
    assert full[50:60] == take(BlendSampler([30, 10], [2, 1], batch_size=6, seed=3, start=50), 10)
    # Two ranks split each global batch; together they see what one process with twice the batch sees.
    ranks = [take(BlendSampler([30, 10], [2, 1], batch_size=3, seed=3, rank=r, world_size=2), 20) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == take(BlendSampler([30, 10], [2, 1], batch_size=6, seed=3), 20)
    # Every sample of a source comes once per epoch.
    one = take(BlendSampler([7], [1], batch_size=7, seed=1), 1)[0]
    assert sorted(i for _, i in one) == list(range(7))


def test_length_grouping_reduces_padding():
    lengths = {(0, i): 10 + (i * 37) % 200 for i in range(64)}
    plain = BlendSampler([64], [1], batch_size=8, seed=0)
    grouped = BlendSampler([64], [1], batch_size=8, seed=0, lengths=lengths.get, group=8)

    def padding(sampler):
        batches = [b for b, _ in zip(sampler, range(8))]
        return sum(max(lengths[k] for k in b) * len(b) - sum(lengths[k] for k in b) for b in batches)

    assert padding(grouped) < padding(plain) / 3


def item(n, seed, images=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 250, (n,), generator=g).tolist()
    return Item(Rendered(ids, [IGNORE] + ids[1:], []), None)


def test_collate_pads_right_and_packing_computes_the_same_loss(tiny):
    model, _ = tiny
    items = [item(10, 1), item(7, 2), item(12, 3)]
    padded = collate(items, pad_id=2)
    assert padded.input_ids.shape == (3, 12) and padded.tokens == 29
    assert padded.attention_mask[1].tolist() == [1] * 7 + [0] * 5 and padded.labels[1, 7:].eq(IGNORE).all()
    packed = collate_packed(items, pad_id=2, max_len=20)
    assert packed.input_ids.shape[0] == 2 and packed.tokens == 29
    with torch.no_grad():
        a = model(padded.input_ids, attention_mask=padded.attention_mask, labels=padded.labels).loss
        b = model(packed.input_ids, attention_mask=packed.attention_mask, labels=packed.labels,
                  position_ids=packed.position_ids).loss
    assert torch.allclose(a, b, atol=1e-5)


def test_a_sample_whose_image_broke_is_skipped_not_fatal(folder, tiny):
    _, processor = tiny
    path = write(folder / "d.json", [dialogue(["a", "b", "c"])])
    samples, _ = read_source(DataSource(path, images=str(folder / "images")))
    (folder / "images" / "b.png").write_bytes(b"garbage")  # broke after the records were read
    dataset = TrainDataset([samples], processor, max_len=512)
    out = dataset[(0, 0)]
    assert out.origin == "d.json#0" and "cannot read image" in out.reason
    batch = collate([out, out], pad_id=0)
    assert batch.input_ids.shape[0] == 0 and len(batch.skipped) == 2
