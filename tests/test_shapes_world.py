"""The shapes world: deterministic renders, prompts that round-trip, disjoint splits."""

import numpy as np
import pytest

from draft.models import shapes


def test_same_seed_same_images_and_different_seed_different_images():
    a, b, c = shapes.draw_examples(8, seed=3), shapes.draw_examples(8, seed=3), shapes.draw_examples(8, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.prompts == b.prompts
    assert not np.array_equal(a.images, c.images)


def test_render_is_deterministic_and_in_range():
    attrs = shapes.Attributes("triangle", "red", "blue", "large")
    x = shapes.render(attrs, 7, size=48)
    np.testing.assert_array_equal(x, shapes.render(attrs, 7, size=48))
    assert x.shape == (3, 48, 48) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1


def test_render_shows_the_colours_and_size_it_names():
    attrs = shapes.Attributes("square", "red", "blue", "small")
    x = shapes.render(attrs, 0)
    red, blue = np.array(shapes.COLOURS["red"]) / 255, np.array(shapes.COLOURS["blue"]) / 255
    pixels = x.reshape(3, -1).T
    near = lambda c: (np.abs(pixels - c).max(1) < 0.1).mean()  # noqa: E731
    assert near(blue) > near(red) > 0.03  # the background dominates; the shape is there
    large = shapes.render(shapes.Attributes("square", "red", "blue", "large"), 0).reshape(3, -1).T
    assert (np.abs(large - red).max(1) < 0.1).mean() > 2 * near(red)


def test_anti_aliasing_gives_intermediate_edge_pixels():
    x = shapes.render(shapes.Attributes("circle", "white", "black", "large"), 1)
    grey = ((x[0] > 0.2) & (x[0] < 0.8)).sum()
    assert grey > 10


def test_prompt_round_trip_for_every_combination():
    for attrs in shapes.combinations("all"):
        assert shapes.parse_prompt(shapes.prompt_of(attrs)) == attrs
    assert shapes.prompt_of(shapes.Attributes("circle", "red", "orange", "small")).endswith("on an orange background")


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("a small red dog on a blue background", "unknown word.*'dog'"),
        ("a small red circle", "expected"),
        ("a small red circle on a red background", "must differ"),
        ("a red small circle on a blue background", "expected"),
    ],
)
def test_parse_prompt_errors_are_clear(prompt, match):
    with pytest.raises(ValueError, match=match):
        shapes.parse_prompt(prompt)


def test_splits_are_disjoint_and_cover_the_world():
    train, heldout = set(shapes.prompts("train")), set(shapes.prompts("heldout"))
    assert train and heldout and not train & heldout
    assert train | heldout == set(shapes.prompts("all"))
    # Held-out prompts are unseen (shape, colour) pairs...
    train_pairs = {(a.shape, a.colour) for a in map(shapes.parse_prompt, train)}
    assert all((a.shape, a.colour) not in train_pairs for a in map(shapes.parse_prompt, heldout))
    # ... made only of words the train split uses.
    for name, classes in shapes.ATTRIBUTES.items():
        for split in (train, heldout):
            assert {getattr(shapes.parse_prompt(p), name) for p in split} == set(classes), (name, classes)


def test_every_attribute_value_appears_in_samples():
    batch = shapes.draw_examples(400, seed=0, split="train")
    for name, classes in shapes.ATTRIBUTES.items():
        assert {getattr(a, name) for a in batch.attributes} == set(classes)
    assert all(shapes.split_of(a) == "train" for a in batch.attributes)
    assert all(shapes.split_of(a) == "heldout" for a in shapes.draw_examples(50, 0, "heldout").attributes)


def test_shipped_prompt_files_match_the_prompt_sets():
    for split in ("train", "heldout"):
        assert shapes.prompt_file(split).read_text().splitlines() == shapes.prompts(split)


def test_every_vocabulary_word_is_used():
    words = {w for p in shapes.prompts("all") for w in p.split()}
    assert words == set(shapes.VOCAB)
