"""SPHINX's sub-image tiles with SPHINX-X's skip tokens: token counts, processor and model agreeing, `render`,
checkpoints, cached decoding, a training step, and tiles off changing nothing."""

import json

import pytest
import torch
from conftest import solid, tiny_config
from PIL import Image as PILImage

from sparkles.cli import main
from sparkles.config import SamplingParams, TileConfig, override
from sparkles.conversation import Conversation, Image, Message, user_message
from sparkles.errors import ConfigError, InputError
from sparkles.generate import Chat, generate
from sparkles.model.checkpoint import load_checkpoint, read_config, save_checkpoint
from sparkles.model.model import build_model
from sparkles.processor import SKIP_TOKEN, Processor, image_to_tensor, tile_layout
from sparkles.session import ChatSession
from sparkles.tokenizer import byte_tokenizer

K = 4  # tiny_config's tokens_per_image
WIDE, SQUARE, TALL = (80, 40), (40, 40), (30, 90)  # the tower sees 32 × 32: a 2 × 2 canvas is 64 × 64
GREEDY = SamplingParams(max_new_tokens=8)


def tiled(grid=(2, 2), skip_empty=True, **changes):
    return tiny_config(tiles=TileConfig(grid=grid, skip_empty=skip_empty), **changes)


def model_for(config, seed=0):
    torch.manual_seed(seed)
    model, processor = build_model(config)
    return model.eval(), processor


def two_images(first=WIDE, second=SQUARE) -> Conversation:
    return Conversation((user_message("Compare IMAGE#1 with IMAGE#2.",
                                      [solid("red", size=first), solid("blue", size=second)]),))


def test_a_tile_is_skipped_exactly_when_it_holds_only_padding():
    assert tile_layout(WIDE, (2, 2), 32) == (True, True, False, False)  # the bottom row is padding
    assert tile_layout(TALL, (2, 2), 32) == (True, False, True, False)  # the right column is padding
    assert tile_layout(SQUARE, (2, 2), 32) == (True,) * 4
    assert tile_layout((100, 99), (2, 2), 32) == (True,) * 4  # a sliver of image keeps a tile
    assert tile_layout((300, 100), (1, 3), 32) == (True,) * 3  # a panorama fills a 1 × 3 grid
    assert tile_layout((300, 100), (3, 3), 32) == (True,) * 3 + (False,) * 6


def test_tokens_per_image_with_and_without_skip_tokens():
    def counts(config):
        processor = Processor(byte_tokenizer((config.image_token,)), config)
        rendered = processor.render(two_images())
        return [processor.image_span(rendered.input_ids, s)[0] for s in rendered.image_starts], processor

    (wide, square), processor = counts(tiled())
    assert (wide, square) == ((1 + 2) * K + 2, (1 + 4) * K)  # two empty tiles: one skip token each
    ids = processor.render(two_images()).input_ids
    assert ids.count(processor.skip_token_id) == 2 and ids.count(processor.image_token_id) == (3 + 5) * K
    assert counts(tiled(skip_empty=False))[0] == [5 * K, 5 * K]  # without skipping every tile costs K
    assert counts(tiny_config())[0] == [K, K]  # tiles off: K per image, as before


def test_pixel_values_are_the_global_view_then_the_tiles_with_skipped_ones_nan():
    config = tiled()
    processor = Processor(byte_tokenizer((config.image_token,)), config)
    pixels = processor.pixel_values(two_images().slots)
    assert pixels.shape == (2, 5, 3, 32, 32)
    assert torch.equal(pixels[0, 0], image_to_tensor(PILImage.new("RGB", WIDE, "red"), config.vision))
    empty = pixels.flatten(2).isnan().all(2)
    assert empty.tolist() == [[False, False, False, True, True], [False] * 5]
    kept = Processor(byte_tokenizer((config.image_token,)), tiled(skip_empty=False)).pixel_values(two_images().slots)
    assert not kept.isnan().any()
    assert kept[0, 3].abs().max() < 0.01  # a padding tile is the mean colour, ≈ 0 once normalised


@pytest.mark.parametrize("skip_empty", [True, False])
def test_processor_and_model_agree_and_empty_tiles_never_reach_the_tower(skip_empty):
    model, processor = model_for(tiled(skip_empty=skip_empty))
    encoded = processor.encode(two_images(), generation=True)
    seen = []
    model.vision.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    ids = torch.tensor([encoded.rendered.input_ids])
    logits = model(ids, encoded.pixel_values).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    # All views in one call: the global views and the tiles with image in them (or every tile, not skipping).
    assert seen == [3 + 5 if skip_empty else 10]


def test_a_mismatch_between_tokens_and_tiles_is_a_clear_error():
    model, processor = model_for(tiled())
    conversation = two_images()
    pixels = processor.pixel_values(conversation.slots)
    # Rendered without the images' sizes: every tile gets K tokens, but the pixels skip two of them.
    blind = Conversation((user_message("Compare IMAGE#1 with IMAGE#2.", [Image(), Image()]),))
    ids = torch.tensor([processor.render(blind).input_ids])
    with pytest.raises(InputError, match="do not match the images' tiles"):
        model.embed(ids, model.encode_images(pixels))
    # One image's features for two images' tokens: the count error names tokens, views and images.
    ids = torch.tensor([processor.render(conversation).input_ids])
    with pytest.raises(InputError, match=r"image tokens: 34 \(10 views\), image features: 1 images × 5 views"):
        model.embed(ids, model.encode_images(pixels[:1]))
    with pytest.raises(InputError, match="image features: 0 images"):
        model.embed(ids, None)


def test_render_shows_the_global_view_and_which_tiles_are_skipped(tmp_path, capsys):
    model, processor = model_for(tiled())
    folder = save_checkpoint(model, processor, tmp_path / "tiled")
    PILImage.new("RGB", WIDE, "red").save(tmp_path / "wide.png")
    PILImage.new("RGB", SQUARE, "blue").save(tmp_path / "square.png")
    record = {"image": ["wide.png", "square.png"], "conversations": [
        {"from": "human", "value": "Compare <image> with <image>."}, {"from": "gpt", "value": "Red and blue."}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["render", str(tmp_path / "d.jsonl"), "--format", "llava", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "⟨image 1: global + 2×2 tiles ■■/□□, 14 tokens at" in out
    assert "⟨image 2: global + 2×2 tiles ■■/■■, 20 tokens at" in out
    assert "IMAGE#1 (80×40): global view + 2×2 tiles, 2 encoded, 2 skipped: 14 tokens = 3 × 4 + 2" in out
    assert "    ■ ■\n    □ □\n" in out


def test_a_checkpoint_saves_and_reloads_the_tiles(tmp_path):
    model, processor = model_for(tiled())
    with torch.no_grad():
        model.connector.skip_token.add_(1.0)  # a trained skip token, not the initial one
    folder = save_checkpoint(model, processor, tmp_path / "tiled")
    config, _ = read_config(folder)
    assert config.tiles == TileConfig(grid=(2, 2), skip_empty=True)
    loaded, loaded_processor = load_checkpoint(folder)
    assert loaded_processor.skip_token_id == processor.skip_token_id
    assert loaded_processor.tokenizer.convert_ids_to_tokens(processor.skip_token_id) == SKIP_TOKEN
    assert torch.equal(loaded.connector.skip_token, model.connector.skip_token)
    encoded = processor.encode(two_images(), generation=True)
    ids = torch.tensor([encoded.rendered.input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids, encoded.pixel_values).logits, loaded(ids, encoded.pixel_values).logits)


def test_cached_decoding_equals_full_recomputation_with_tiles():
    model, processor = model_for(tiled(system_prompt="Look closely."))
    chat, session = Chat(model, processor), ChatSession(model, processor)
    conversation = Conversation()
    turns = [("Compare IMAGE#1 with IMAGE#2.", {"red": WIDE, "blue": SQUARE}), ("Is <image> like IMAGE#1?",
                                                                                 {"green": TALL})]
    for text, sizes in turns:
        images = [solid(colour, size=size) for colour, size in sizes.items()]
        conversation = conversation.append(user_message(text, images, known=conversation.labels))
        expected = chat.answer(conversation, GREEDY)
        assert "".join(session.stream(text, images, GREEDY)).strip() == expected
        conversation = session.conversation
    assert session.stats["tokens_reused"] > 0
    encoded = processor.encode(two_images(), generation=True)
    with torch.no_grad():
        embeds = model.embed(torch.tensor([encoded.rendered.input_ids]), model.encode_images(encoded.pixel_values))
    params = SamplingParams(max_new_tokens=16)
    assert [int(t) for t in generate(model.lm, embeds, params)] == [int(t) for t in generate(model.lm, embeds, params,
                                                                                             use_cache=False)]


def test_a_short_training_step_learns_and_trains_the_skip_token():
    model, processor = model_for(tiled(trainable=("connector",)))
    model.train()
    conversation = two_images().append(Message.text_only("assistant", "Red, then blue."))
    encoded = processor.encode(conversation)
    ids, labels = torch.tensor([encoded.rendered.input_ids]), torch.tensor([encoded.rendered.labels])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start, losses = model.connector.skip_token.detach().clone(), []
    for _ in range(8):
        loss = model(ids, encoded.pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        assert model.connector.skip_token.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert not torch.equal(start, model.connector.skip_token)


def test_the_training_loop_runs_with_tiles(tmp_path):
    """Batches of tiled images through the real loop: collation, the 5-D pixel values, the skip token's group."""
    from sparkles.config import DataConfig, DataSource, OptimConfig, TrainConfig
    from sparkles.train.loop import train

    records = []
    for n, size in enumerate([WIDE, SQUARE, TALL, WIDE]):
        PILImage.new("RGB", size, (200, 60 * n, 30)).save(tmp_path / f"{n}.png")
        records.append({"image": f"{n}.png", "conversations": [{"from": "human", "value": "<image> Colour?"},
                                                                {"from": "gpt", "value": f"Shade {n}."}]})
    (tmp_path / "d.json").write_text(json.dumps(records))
    config = TrainConfig(model=tiled(trainable=("connector", "lm")), out=str(tmp_path / "run"), save_every=100,
                         data=DataConfig(sources=(DataSource(str(tmp_path / "d.json"), images=str(tmp_path)),)),
                         optim=OptimConfig(lr_connector=1e-2, lr_lm=1e-2, max_steps=6, batch_size=4), seed=1)
    loaded, _ = load_checkpoint(train(config))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert loaded.config.tiles == TileConfig(grid=(2, 2))


def test_tiles_off_is_the_model_of_before():
    plain, plain_processor = model_for(tiny_config())
    off, off_processor = model_for(tiny_config(tiles=TileConfig(grid=(0, 0), skip_empty=True)))
    assert off_processor.views == 1 and off_processor.skip_token_id is None
    assert len(off_processor.tokenizer) == len(byte_tokenizer((plain.config.image_token,)))  # no token added
    assert not hasattr(off.connector, "skip_token")
    assert plain.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), off.state_dict().values()))
    encoded = off_processor.encode(two_images(), generation=True)
    assert encoded.pixel_values.shape == (2, 3, 32, 32)
    assert encoded.rendered == plain_processor.encode(two_images(), generation=True).rendered
    assert "⟨image 1 × 4 at" in off_processor.visualize(encoded.rendered)


def test_the_switch_is_a_dotted_override_and_bad_grids_are_refused():
    config = override(tiny_config(), {"tiles.grid": "2,3", "tiles.skip_empty": "false"})
    assert config.tiles == TileConfig(grid=(2, 3), skip_empty=False)
    with pytest.raises(ConfigError, match="tiles.grid must be"):
        build_model(tiled(grid=(2, 0)))
    with pytest.raises(ConfigError, match="tokens_per_image >= 2"):
        build_model(tiled(tokens_per_image=1, connector="resampler"))


def test_a_skip_token_is_input_only_even_past_the_lms_table():
    """A pretrained LM has no row for the skip token (it was added to the tokenizer for us): the repetition penalty
    must not look it up, and no front end may generate it."""
    model, processor = model_for(tiled())
    skip = processor.skip_token_id
    assert model.input_only_ids == (model.image_token_id, skip)
    model.lm.resize_token_embeddings(min(model.image_token_id, skip))  # as if both ids were past a real LM's table
    penalised = SamplingParams(max_new_tokens=6, repetition_penalty=1.3, temperature=0.8, seed=1)
    conversation = two_images()
    chat = Chat(model, processor)
    assert isinstance(chat.answer(conversation, penalised), str)
    assert len(chat.answer_batch([conversation, conversation], penalised)) == 2
    assert isinstance(ChatSession(model, processor).answer(conversation[-1], params=penalised), str)
    ids = torch.tensor([processor.render(conversation, generation=True).input_ids])
    assert skip in ids and not torch.isin(model.text_ids(ids), torch.tensor(model.input_only_ids)).any()
