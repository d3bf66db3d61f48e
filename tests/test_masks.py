import random

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from transfusion_pytorch.layout import build_layout
from transfusion_pytorch.masks import and_masks, causal, dense_mask, modality_bidirectional, or_masks, same_document, transfusion_mask


def random_layout(seed: int):
    rng = random.Random(seed)
    rows, lengths = [], []
    for _ in range(rng.randint(1, 4)):
        row = []
        for _ in range(rng.randint(0, 3)):
            row.append(torch.zeros(rng.randint(1, 5), dtype=torch.long))
            row.append(len(lengths))
            lengths.append(rng.randint(1, 6))
        row.append(torch.zeros(rng.randint(1, 4), dtype=torch.long))
        rows.append(row)
    return build_layout(rows, lengths)


@pytest.mark.parametrize("seed", range(8))
def test_dense_mask_equals_flex_create_mask(seed):
    layout = random_layout(seed)
    document_ids = (torch.arange(layout.seq_len) // 5).expand(layout.batch, -1).contiguous()
    for fn in (transfusion_mask(layout.token_instance), transfusion_mask(layout.token_instance, document_ids)):
        dense = dense_mask(fn, layout.batch, layout.seq_len, layout.seq_len)
        reference = create_mask(fn, layout.batch, 1, layout.seq_len, layout.seq_len, device="cpu")
        assert torch.equal(dense, reference)


def test_hand_worked_example():
    # row: t t [i i i] t  — tokens 2, 3, 4 are one image
    instance_ids = torch.tensor([[-1, -1, 0, 0, 0, -1]])
    mask = dense_mask(transfusion_mask(instance_ids), 1, 6, 6)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0],  # image tokens see the text before and the whole image
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],  # text after the image sees everything before it
        ]
    )
    assert torch.equal(mask, expected)


def test_two_images_do_not_see_later_image():
    instance_ids = torch.tensor([[-1, 0, 0, -1, 1, 1]])
    mask = dense_mask(transfusion_mask(instance_ids), 1, 6, 6)[0, 0]
    assert not mask[1:3, 4:].any()  # first image never sees the second
    assert mask[4:, 1:3].all()  # second image sees the first
    assert mask[1, 2] and mask[4, 5] and mask[5, 4]


def test_rules_alone():
    instance_ids = torch.tensor([[0, 0, -1]])
    bidirectional = dense_mask(modality_bidirectional(instance_ids), 1, 3, 3)[0, 0]
    assert bidirectional.tolist() == [[True, True, False], [True, True, False], [False, False, False]]
    docs = torch.tensor([[0, 0, 1]])
    packed = dense_mask(and_masks(causal, same_document(docs)), 1, 3, 3)[0, 0]
    assert packed.tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    union = dense_mask(or_masks(causal, modality_bidirectional(instance_ids)), 1, 3, 3)[0, 0]
    assert union[0, 1] and not union[1, 2]


def test_dense_mask_with_query_offset_matches_tail_of_full_mask():
    full = dense_mask(causal, 1, 7, 7)
    tail = dense_mask(causal, 1, 3, 7, q_offset=4)
    assert torch.equal(full[:, :, 4:], tail)
