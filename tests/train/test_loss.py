"""InfoNCE with cross-worker negatives: 2 gloo processes must equal one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from raysys.train.loss import info_nce_loss, similarity_distillation_loss

BATCH, DIM, WORLD = 6, 16, 2


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH * WORLD, DIM, generator=g)
    p = q + 0.5 * torch.randn(BATCH * WORLD, DIM, generator=g)
    n = torch.randn(BATCH * WORLD, DIM, generator=g)
    return q, p, n


def encoder(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Linear(DIM, DIM)


def embed(model, x):
    return F.normalize(model(x), dim=-1)


def with_distillation(loss, model, q, p, gather: bool):
    """+ the similarity distillation toward another (frozen) encoder's embeddings of q and p."""
    teacher = encoder(seed=2)
    with torch.no_grad():
        t_q, t_p = embed(teacher, q), embed(teacher, p)
    return loss + similarity_distillation_loss(embed(model, q), embed(model, p), t_q, t_p, temperature=0.1,
                                               gather=gather)


def with_duplicates(q, p, n):
    """Text keys for p and n with copies of positives across the two workers' halves: pair 7's
    passage is pair 1's, hard negative 2 is pair 8's passage (inputs made equal, keys equal)."""
    p, n = p.clone(), n.clone()
    p[7], n[2] = p[1], p[8]
    p_keys, n_keys = torch.arange(BATCH * WORLD), torch.arange(BATCH * WORLD) + 100
    p_keys[7], n_keys[2] = p_keys[1], p_keys[8]
    return q, p, n, p_keys, n_keys


def inputs(duplicates: bool):
    q, p, n = make_inputs()
    return with_duplicates(q, p, n) if duplicates else (q, p, n, None, None)


def single_process(hard_negatives: bool, symmetric: bool, distill: bool = False, duplicates: bool = False):
    q, p, n, p_keys, n_keys = inputs(duplicates)
    model = encoder()
    loss, _ = info_nce_loss(embed(model, q), embed(model, p), embed(model, n) if hard_negatives else None,
                            temperature=0.05, symmetric=symmetric, gather=False, passage_keys=p_keys,
                            negative_keys=n_keys)
    if distill:
        loss = with_distillation(loss, model, q, p, gather=False)
    loss.backward()
    return loss.item(), model.weight.grad.clone()


def _worker(rank, port, hard_negatives, symmetric, distill, duplicates, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    q, p, n, p_keys, n_keys = (t if t is None else t[rank * BATCH:(rank + 1) * BATCH] for t in inputs(duplicates))
    model = encoder()
    loss, _ = info_nce_loss(embed(model, q), embed(model, p), embed(model, n) if hard_negatives else None,
                            temperature=0.05, symmetric=symmetric, passage_keys=p_keys, negative_keys=n_keys)
    if distill:
        loss = with_distillation(loss, model, q, p, gather=True)
    loss.backward()
    grad = model.weight.grad.clone()
    dist.all_reduce(grad)  # what DeepSpeed/DDP do: average gradients over workers
    total = torch.tensor([loss.item()])
    dist.all_reduce(total)
    torch.save(((total / WORLD).item(), grad / WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # both results are on disk before either rank tears anything down
    # Gloo's teardown at interpreter exit sometimes aborts ("terminate called without an active
    # exception") when the peer closed first; the results are saved, so leave without it.
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("hard_negatives,symmetric,distill,duplicates", [
    (False, False, False, False), (True, False, False, False), (True, True, False, False), (True, False, True, False),
    (True, False, False, True)])
def test_two_workers_equal_one_process_on_the_concatenated_batch(hard_negatives, symmetric, distill, duplicates,
                                                                 tmp_path):
    # Results come back through files: an mp.Manager() would fork this process, and forking a
    # process that holds Ray's gRPC clients (the suite's `ray_local`) leaves them hung.
    mp.spawn(_worker, args=(free_port(), hard_negatives, symmetric, distill, duplicates, str(tmp_path)),
             nprocs=WORLD, join=True)
    ref_loss, ref_grad = single_process(hard_negatives, symmetric, distill, duplicates)
    for rank in range(WORLD):
        loss, grad = torch.load(tmp_path / f"rank{rank}.pt")
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_copies_of_the_positive_are_left_out_of_the_negatives():
    """Masked InfoNCE equals cross-entropy over the candidates minus the copies, written out; without
    keys the copies count as negatives (a higher loss)."""
    q, p, n, p_keys, n_keys = with_duplicates(*make_inputs())
    q, p, n = (F.normalize(t, dim=-1) for t in (q, p, n))
    masked, accuracy = info_nce_loss(q, p, n, temperature=0.1, gather=False, passage_keys=p_keys, negative_keys=n_keys)
    candidates, keys = torch.cat([p, n]), torch.cat([p_keys, n_keys])
    expected = []
    for i in range(len(q)):
        keep = [j for j in range(len(candidates)) if j == i or keys[j] != p_keys[i]]
        scores = q[i] @ candidates[keep].T / 0.1
        expected.append(torch.logsumexp(scores, 0) - scores[keep.index(i)])
    assert sum(len(candidates) - 1 - sum(1 for j in range(len(candidates)) if j != i and keys[j] != p_keys[i])
               for i in range(len(q))) == 3  # pairs 1 and 7 see each other's passage; pair 8 sees negative 2
    assert masked.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    unmasked, _ = info_nce_loss(q, p, n, temperature=0.1, gather=False)
    assert unmasked > masked and 0 <= accuracy <= 1


def test_hard_negatives_are_negatives_not_targets():
    # A hard negative identical to its query must raise the loss, not lower it.
    q = F.normalize(torch.randn(4, DIM), dim=-1)
    p = F.normalize(q + 0.3 * torch.randn(4, DIM), dim=-1)
    base, _ = info_nce_loss(q, p, F.normalize(torch.randn(4, DIM), dim=-1), gather=False)
    confusing, _ = info_nce_loss(q, p, q.clone(), gather=False)
    assert confusing > base


def test_similarity_distillation_is_kl_from_the_teacher_and_pulls_the_student_towards_it():
    q, p, _ = make_inputs(3)
    teacher_q, teacher_p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    assert similarity_distillation_loss(teacher_q, teacher_p, teacher_q, teacher_p, gather=False).item() == \
        pytest.approx(0.0, abs=1e-6)
    student_q = F.normalize(torch.randn(q.shape, generator=torch.Generator().manual_seed(4)), dim=-1).requires_grad_()
    frozen_q = teacher_q.clone().requires_grad_()
    loss = similarity_distillation_loss(student_q, teacher_p, frozen_q, teacher_p, temperature=0.1, gather=False)
    # KL(teacher || student) written out: sum_j t_j (log t_j - log s_j), mean over queries.
    t = torch.softmax(teacher_q @ teacher_p.T / 0.1, dim=1)
    s = torch.softmax(student_q.detach() @ teacher_p.T / 0.1, dim=1)
    assert loss.item() == pytest.approx((t * (t.log() - s.log())).sum(1).mean().item(), rel=1e-5)
    loss.backward()
    assert frozen_q.grad is None  # the teacher's side carries no gradient
    stepped = (student_q - 0.05 * student_q.grad).detach()
    assert similarity_distillation_loss(stepped, teacher_p, teacher_q, teacher_p, temperature=0.1,
                                        gather=False).item() < loss.item()
