import contextlib

import pytest
import torch

from project import tiny_clip

from clipdistill import clip_training
from clipdistill.clip_training import caption_vocabulary, train_clip
from clipdistill.resumable import Checkpoints

CAPTIONS = ["a photo of a circle", "a sketch of a star", "a painting of a heart", "a photo of a star"]


def world(n=24):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    return images, [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]


def seeded_clip(vision="convnet"):
    torch.manual_seed(0)
    return tiny_clip(vision=vision, vision_width=8 if vision == "convnet" else 32)


def trained(monkeypatch=None, *, whole_table=False, vision="convnet", checkpoints=None, epochs=3):
    if whole_table:  # the loop as it was: AdamW over every row of the token table
        monkeypatch.setattr(clip_training, "caption_vocabulary", lambda model, tokens: contextlib.nullcontext(tokens))
    clip = seeded_clip(vision)
    images, captions = world()
    losses = train_clip(clip, images, captions, epochs=epochs, batch_size=8, lr=0.01, weight_decay=0.1,
                        generator=torch.Generator().manual_seed(2), device=torch.device("cpu"),
                        checkpoints=checkpoints)
    return clip, losses


@pytest.mark.parametrize("vision", ["convnet", "vit"])
def test_training_the_captions_rows_ends_in_the_same_weights_bit_for_bit(monkeypatch, vision):
    ours, ours_losses = trained(vision=vision)
    whole, whole_losses = trained(monkeypatch, whole_table=True, vision=vision)
    assert ours_losses == whole_losses
    a, b = ours.model.state_dict(), whole.model.state_dict()
    assert list(a) == list(b)  # the same names in the same order: checkpoints and clip.pt are as before
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and training did move the caption rows
    fresh = seeded_clip(vision).model.token_embedding.weight
    used = torch.unique(ours._tokenizer(CAPTIONS))
    assert not torch.equal(a["token_embedding.weight"][used], fresh[used])


def test_caption_vocabulary_renumbers_in_order_and_restores_the_full_table():
    clip = seeded_clip()
    full = clip.model.token_embedding
    tokens = clip._tokenizer(CAPTIONS)
    used = torch.unique(tokens)
    with caption_vocabulary(clip.model, tokens) as ids:
        rows = clip.model.token_embedding
        assert rows.weight.shape == (len(used), full.embedding_dim)
        assert torch.equal(ids.argmax(-1), tokens.argmax(-1))  # end-of-text pooling finds the same position
        assert torch.equal(rows(ids), full(tokens))
        with torch.no_grad():
            rows.weight.add_(1.0)
    assert clip.model.token_embedding is full
    assert full.weight.shape[0] == 49408
    changed = (full.weight != seeded_clip().model.token_embedding.weight).any(-1)
    assert changed.nonzero().flatten().tolist() == used.tolist()  # the used rows, written back; no others


def test_caption_vocabulary_leaves_other_pooling_alone():
    clip = tiny_clip()
    clip.model.text_pool_type = "eos"  # pools at a fixed token id, which renumbering would move
    tokens = clip._tokenizer(CAPTIONS)
    full = clip.model.token_embedding
    with caption_vocabulary(clip.model, tokens) as ids:
        assert ids is tokens and clip.model.token_embedding is full


def test_a_resumed_training_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    straight, _ = trained(epochs=3)
    done = []
    real_step = clip_training.run_steps

    def stop_after_two_saves(step, total, **kw):
        def counted(i):
            if len(done) == 5:
                raise KeyboardInterrupt
            done.append(i)
            return step(i)
        return real_step(counted, total, **kw)

    monkeypatch.setattr(clip_training, "run_steps", stop_after_two_saves)
    with pytest.raises(KeyboardInterrupt):
        trained(checkpoints=Checkpoints(tmp_path, every=2), epochs=3)
    monkeypatch.setattr(clip_training, "run_steps", real_step)
    resumed, losses = trained(checkpoints=Checkpoints(tmp_path, every=2), epochs=3)
    assert len(losses) == 9
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
