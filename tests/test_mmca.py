"""Multi-modal causal attention (DeepSpeed-VisualChat, spec/peers.md §1.3 and §7.2), `model.attention`: which rows
see which columns, where it agrees with causal attention, KV-cache and session equality, checkpoints, training."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import logits, solid, steps_on_one_answer, tiny_config, two_images

from sparkles.config import LoraConfig, SamplingParams
from sparkles.conversation import Conversation, Message, Text, user_message
from sparkles.engine import Engine, EngineConfig
from sparkles.generate import Chat, cache_kwargs, generate
from sparkles.model.attention import lm_kwargs, mmca_attention, mmca_masks
from sparkles.model.checkpoint import load_checkpoint, read_config, save_checkpoint
from sparkles.model.model import build_model
from sparkles.session import ChatSession

MMCA = ["mmca", "mmca-image-sees-text"]
GREEDY = SamplingParams(max_new_tokens=8)
KINDS = "ttiitit"  # a hand-made sequence: text, text, image, image, text, image, text


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()[None, None]  # (1, 1, n, n)


def allowed_columns(branch: torch.Tensor, row: int) -> list[int]:
    return branch[0, 0, row].nonzero().flatten().tolist()


def build(attention="causal", **changes):
    torch.manual_seed(0)
    model, processor = build_model(tiny_config(attention=attention, **changes))
    return model.eval(), processor




# (a) The masks on a hand-made sequence


@pytest.mark.parametrize("sees_text", [False, True])
def test_which_rows_see_which_columns(sees_text):
    is_image = torch.tensor([[k == "i" for k in KINDS]])
    text, image = mmca_masks(causal(len(KINDS)), is_image, image_sees_text=sees_text)
    assert allowed_columns(text, 1) == [0, 1] and allowed_columns(image, 1) == []  # no image before it: empty branch
    assert allowed_columns(text, 4) == [0, 1, 4] and allowed_columns(image, 4) == [2, 3]
    assert allowed_columns(text, 6) == [0, 1, 4, 6] and allowed_columns(image, 6) == [2, 3, 5]
    # Image rows see image tokens up to themselves (their own image's and earlier ones), text only with the flag.
    assert allowed_columns(image, 2) == [2] and allowed_columns(image, 3) == [2, 3]
    assert allowed_columns(image, 5) == [2, 3, 5]
    assert allowed_columns(text, 3) == ([0, 1] if sees_text else [])
    assert allowed_columns(text, 5) == ([0, 1, 4] if sees_text else [])


def test_queries_on_a_cache_are_the_last_rows_and_padding_stays_out():
    is_image = torch.tensor([[k == "i" for k in KINDS]])
    text, image = mmca_masks(causal(len(KINDS))[..., -2:, :], is_image, image_sees_text=False)  # rows 5 and 6
    assert allowed_columns(text, 0) == [] and allowed_columns(image, 0) == [2, 3, 5]
    assert allowed_columns(text, 1) == [0, 1, 4, 6] and allowed_columns(image, 1) == [2, 3, 5]
    padded = causal(len(KINDS)).clone()
    padded[..., 0] = False  # position 0 is left padding
    text, _ = mmca_masks(padded, is_image, image_sees_text=False)
    assert allowed_columns(text, 4) == [1, 4]


@pytest.mark.parametrize("sees_text", [False, True])
def test_empty_branches_are_zero_and_each_branch_is_one_plain_softmax(sees_text):
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 2, len(KINDS), 8) for _ in range(3))
    is_image = torch.tensor([[k == "i" for k in KINDS]])
    module = torch.nn.Module().eval()
    out, _ = mmca_attention(module, query, key, value, causal(len(KINDS)), image_sees_text=sees_text,
                            mmca_image_mask=is_image)
    out = out.transpose(1, 2)  # (B, H, T, d)

    def softmax_over(row, columns):
        weights = (query[..., row:row + 1, :] @ key[..., columns, :].transpose(-1, -2) / 8 ** 0.5).softmax(-1)
        return (weights @ value[..., columns, :])[..., 0, :]  # (B, H, d)

    assert torch.isfinite(out).all()
    # A text row before any image gets its text branch alone: exactly what causal attention gives it.
    plain = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    assert torch.allclose(out[..., 1, :], plain[..., 1, :], atol=1e-6)
    assert torch.allclose(out[..., 4, :], softmax_over(4, [0, 1, 4]) + softmax_over(4, [2, 3]), atol=1e-6)
    image_row = softmax_over(5, [2, 3, 5]) + (softmax_over(5, [0, 1, 4]) if sees_text else 0)
    assert torch.allclose(out[..., 5, :], image_row, atol=1e-6)


def test_a_row_with_nothing_to_attend_to_is_zero_with_finite_gradients():
    query, key, value = (torch.randn(1, 2, 3, 8, requires_grad=True) for _ in range(3))
    allowed = causal(3).clone()
    allowed[..., 0] = False  # left padding: row 0 sees nothing at all
    out, _ = mmca_attention(torch.nn.Module(), query, key, value, allowed,
                            mmca_image_mask=torch.tensor([[False, True, False]]))
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (query, key, value))


# (b) Where MMCA agrees with causal attention and where it does not


def test_rows_before_the_first_image_and_text_only_sequences_are_as_causal():
    """Before the first image no row has an image branch and every key is text, so every layer computes what causal
    attention computes; after it, text rows add an image softmax and the logits part. Without images, nothing does."""
    models = {a: build(a) for a in ["causal", *MMCA]}
    conversation = two_images()
    first = models["causal"][1].encode(conversation, generation=True).rendered.image_starts[0]
    out = {a: logits(m, p, conversation) for a, (m, p) in models.items()}
    for attention in MMCA:
        assert torch.allclose(out[attention][:first], out["causal"][:first], atol=1e-5)
        assert not torch.allclose(out[attention][first:], out["causal"][first:], atol=1e-3)
    # The two published forms part at the image rows (which see text or not), hence at every later row.
    assert not torch.allclose(out["mmca"][first:], out["mmca-image-sees-text"][first:], atol=1e-3)
    text_only = Conversation((Message.text_only("user", "What is a square?"),))
    plain = logits(*models["causal"], text_only)
    for attention in MMCA:
        assert torch.allclose(logits(*models[attention], text_only), plain, atol=1e-5)


def test_the_switch_adds_no_weights_and_causal_keeps_the_lm_attention():
    (causal_model, _), (mmca_model, _) = build("causal"), build("mmca")
    assert causal_model.lm.config._attn_implementation == "sdpa"
    assert mmca_model.lm.config._attn_implementation == "sparkles_mmca"
    a, b = causal_model.state_dict(), mmca_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# (c) KV cache and sessions


@pytest.mark.parametrize("attention", MMCA)
def test_cached_decoding_gives_the_logits_of_one_forward(attention):
    """Prefill in two chunks (the second holds an image, on top of a cache that holds one), then one token at a
    time: each step's logits are those of one forward over everything. Grouped-query heads, to cover them too."""
    language = tiny_config().language
    language = dataclasses.replace(language, config={**language.config, "num_key_value_heads": 1})
    model, processor = build(attention, language=language)
    encoded = processor.encode(two_images(), generation=True)
    prompt = torch.tensor([encoded.rendered.input_ids])
    ids = torch.cat([prompt, torch.randint(70, 120, (1, 6))], dim=1)
    split, end = (encoded.rendered.image_starts[0] + encoded.rendered.image_starts[1]) // 2, prompt.shape[1]
    from transformers import DynamicCache

    with torch.no_grad():
        whole = model(ids, encoded.pixel_values).logits[0]  # (T, V)
        embeds, images = model.embed(ids, model.encode_images(encoded.pixel_values)), model.image_positions(ids)
        cache, steps = DynamicCache(), []
        for a, b in [(0, split), (split, end), *[(t, t + 1) for t in range(end, ids.shape[1])]]:
            out = model.lm(inputs_embeds=embeds[:, a:b], use_cache=True, **cache_kwargs(model.lm, cache),
                           **lm_kwargs(images[:, :b]))
            steps.append(out.logits[0, -1])
    assert torch.allclose(torch.stack(steps), whole[[split - 1, *range(end - 1, ids.shape[1])]], atol=1e-5)


@pytest.mark.parametrize("attention", MMCA)
def test_cached_greedy_generation_equals_full_recomputation(attention):
    model, processor = build(attention)
    encoded = processor.encode(two_images(), generation=True)
    ids = torch.tensor([encoded.rendered.input_ids])
    embeds = model.embed(ids, model.encode_images(encoded.pixel_values)).detach()
    params, images = SamplingParams(max_new_tokens=16), model.image_positions(ids)
    cached = [int(t) for t in generate(model.lm, embeds, params, image_mask=images)]
    uncached = [int(t) for t in generate(model.lm, embeds, params, image_mask=images, use_cache=False)]
    assert len(cached) == 16 and cached == uncached


def test_any_hf_causal_lm_takes_it():
    """Qwen2 (grouped-query heads, biased projections) built from a config as an 'hf' LM: the switch changes its
    logits once an image is seen, and its cached decoding still equals full recomputation."""
    from sparkles.config import LanguageConfig
    from sparkles.tokenizer import byte_tokenizer

    language = LanguageConfig(kind="hf", config={
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "vocab_size": 300})
    built = {}
    for attention in ("causal", "mmca"):
        torch.manual_seed(0)
        model, processor = build_model(tiny_config(attention=attention, language=language),
                                       tokenizer=byte_tokenizer(("<image>",)))
        built[attention] = model.eval(), processor
    model, processor = built["mmca"]
    assert not torch.allclose(logits(*built["causal"], two_images()), logits(model, processor, two_images()))
    encoded = processor.encode(two_images(), generation=True)
    ids = torch.tensor([encoded.rendered.input_ids])
    embeds = model.embed(ids, model.encode_images(encoded.pixel_values)).detach()
    params, images = SamplingParams(max_new_tokens=12), model.image_positions(ids)
    assert ([int(t) for t in generate(model.lm, embeds, params, image_mask=images)]
            == [int(t) for t in generate(model.lm, embeds, params, image_mask=images, use_cache=False)])


@pytest.mark.parametrize("attention", MMCA)
def test_a_session_over_two_turns_equals_full_reprefill(attention):
    model, processor = build(attention)
    chat, session = Chat(model, processor), ChatSession(model, processor)
    conversation = Conversation()
    for text, colors in [("Compare IMAGE#1 with IMAGE#2.", ["red", "blue"]), ("And IMAGE#3?", ["green"])]:
        conversation = conversation.append(user_message(text, [solid(c) for c in colors], known=conversation.labels))
        expected = chat.answer(conversation, GREEDY)
        assert session.answer(text, [solid(c) for c in colors], GREEDY) == expected
        conversation = conversation.append(Message("assistant", (Text(expected),)))
        held = torch.tensor([session.cache.token_ids]) == model.image_token_id
        assert torch.equal(session.cache.image, held)  # the cache knows its image positions, cropped with it
    assert session.stats["tokens_reused"] > 0
    session.undo()
    assert session.cache.image.shape[1] == session.cache.length


@pytest.mark.parametrize("attention", MMCA)
def test_batches_and_the_engine_with_its_prefix_cache_answer_as_one_row_alone(attention):
    model, processor = build(attention)
    chat = Chat(model, processor)
    conversations = [two_images(), two_images("IMAGE#2 or IMAGE#1, which is red?", ("green", "red")),
                     Conversation((Message.text_only("user", "Hello there."),))]
    alone = [chat.answer(c, GREEDY) for c in conversations]
    assert chat.answer_batch(conversations, GREEDY) == alone
    follow = conversations[0].append(Message("assistant", (Text(alone[0]),)))
    follow = follow.append(user_message("And IMAGE#3?", [solid("green")], known=follow.labels))
    engine = Engine(model, processor, EngineConfig(max_batch=4, prefix_cache_mb=16))
    try:
        first = ["".join(e.text for e in engine.submit(engine.encode(c), GREEDY)) for c in conversations]
        resumed = "".join(e.text for e in engine.submit(engine.encode(follow), GREEDY))
    finally:
        engine.close()
    assert [a.strip() for a in first] == alone
    assert engine.prefix.counts["hits"] >= 1 and resumed.strip() == chat.answer(follow, GREEDY)


# (d) Checkpoints


def test_a_checkpoint_keeps_the_switch_and_the_logits(tmp_path):
    model, processor = build("mmca-image-sees-text")
    folder = save_checkpoint(model, processor, tmp_path / "mmca")
    assert read_config(folder)[0].attention == "mmca-image-sees-text"
    loaded, loaded_processor = load_checkpoint(folder)
    assert loaded.lm.config._attn_implementation == "sparkles_mmca_image_sees_text"
    assert torch.equal(logits(loaded, loaded_processor, two_images()), logits(model, processor, two_images()))


# (e) Training


def test_a_few_training_steps_with_lora_lower_the_loss_and_packed_rows_equal_rows_alone():
    pytest.importorskip("peft", reason="LoRA needs the [lora] extra, which .ci/run installs")
    model, processor = build("mmca", lora=LoraConfig(r=4), trainable=("connector", "lm"))
    def lora_learns(model, loss):
        lora = [p.grad for n, p in model.lm.named_parameters() if "lora_B" in n]
        assert torch.isfinite(loss) and lora and all(g is not None and torch.isfinite(g).all() for g in lora)

    losses = steps_on_one_answer(model, processor, two_images(), "IMAGE#1 is red.", check=lora_learns)
    assert losses[-1] < losses[0]
    # Two samples packed in one row under a block-diagonal mask give each sample's own logits.
    model.eval()
    encoded = processor.encode(two_images().append(Message("assistant", (Text("IMAGE#1 is red."),))))
    ids = torch.tensor([encoded.rendered.input_ids])
    n = ids.shape[1]
    packed = torch.zeros(1, 1, 2 * n, 2 * n, dtype=torch.bool)
    packed[..., :n, :n] = packed[..., n:, n:] = causal(n)
    positions = torch.arange(n).repeat(2)[None]
    pixels = torch.cat([encoded.pixel_values, encoded.pixel_values])
    with torch.no_grad():
        two = model(ids.repeat(1, 2), pixels, attention_mask=packed, position_ids=positions).logits[0]
        one = model(ids, encoded.pixel_values).logits[0]
    assert torch.allclose(two[:n], one, atol=1e-5) and torch.allclose(two[n:], one, atol=1e-5)
