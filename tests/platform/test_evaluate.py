"""The kNN monitor on problems whose answer is known."""
import torch

from sslab.evaluation.knn import knn_accuracy, knn_predict


def test_knn_on_separated_clusters_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 5
    bank_y = torch.arange(4).repeat_interleave(50)
    bank = centres[bank_y] + 0.3 * torch.randn(200, 4, generator=g)
    q_y = torch.arange(4).repeat_interleave(10)
    queries = centres[q_y] + 0.3 * torch.randn(40, 4, generator=g)
    assert knn_accuracy(bank, bank_y, queries, q_y, 4, k=20, t=0.1) == 1.0


def test_weighted_vote_by_hand():
    # query (1, 0): neighbours at cos 1.0 (class 0) and cos 0.8, 0.6 (class 1). With t=0.1 the single close
    # neighbour outweighs the two farther ones: e^10 > e^8 + e^6; with a large t the majority wins.
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_predict(q, bank, labels, 2, k=3, t=0.1).item() == 0
    assert knn_predict(q, bank, labels, 2, k=3, t=100.0).item() == 1


def test_knn_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(1)
    bank, labels = torch.randn(300, 8, generator=g), torch.randint(0, 5, (300,), generator=g)
    q = torch.randn(77, 8, generator=g)
    assert torch.equal(knn_predict(q, bank, labels, 5, k=10, chunk=7), knn_predict(q, bank, labels, 5, k=10))
