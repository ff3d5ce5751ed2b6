"""Miniatures of tllib's task-adaptation scripts (examples/task_adaptation/image_classification/{delta,bss,lwf,
co_tuning,bi_tuning}.py): their regularization calls made the way each script makes them, with only the
``tllib.regularization`` imports changed to ``finereg.compat.tllib``, on a tiny backbone and random images."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from finereg._checks import FineregWarning

NUM_CLASSES, SOURCE_CLASSES = 3, 5


class Backbone(nn.Module):
    """tllib's backbone convention: ``out_features`` and ``copy_head()`` (a copy of the pretrained head ``fc``)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, SOURCE_CLASSES)
        self.out_features = 6

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (b, 6, h, w); the classifier pools

    def copy_head(self):
        return copy.deepcopy(self.fc)


def pretrained_backbone():
    torch.manual_seed(0)  # the same "pretrained" weights every time, as utils.get_model(arch) loads them
    return Backbone()


def dataset(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % NUM_CLASSES)


class CombineDataset(Dataset):
    """tllib's common.utils.data.CombineDataset: the items of several datasets, concatenated per index."""

    def __init__(self, datasets):
        self.datasets = datasets

    def __len__(self):
        return len(self.datasets[0])

    def __getitem__(self, i):
        return sum((tuple(d[i]) for d in self.datasets), ())


def _star(module):
    ns = {}
    exec(f"from finereg.compat.tllib.{module} import *", ns)
    return ns


def test_delta_script(one_thread):
    ns = _star("delta")  # `from tllib.regularization.delta import *`: torch, nn, get_attribute come from it too
    torch_, nn_, get_attribute = ns["torch"], ns["nn"], ns["get_attribute"]
    from finereg.compat.tllib.bi_tuning import ClassifierBase as Classifier  # tllib.modules.classifier.Classifier

    train_dataset = dataset()
    classifier = Classifier(pretrained_backbone(), NUM_CLASSES)
    backbone_source = pretrained_backbone()
    source_classifier = Classifier(
        backbone_source, num_classes=backbone_source.fc.out_features, head=backbone_source.copy_head()
    )
    for param in source_classifier.parameters():
        param.requires_grad = False
    source_classifier.eval()
    optimizer = torch_.optim.SGD(classifier.get_parameters(0.01), momentum=0.9, weight_decay=0.0, nesterov=True)
    return_layers = ["backbone.conv1", "backbone.conv2"]
    source_getter = ns["IntermediateLayerGetter"](source_classifier, return_layers=return_layers)
    target_getter = ns["IntermediateLayerGetter"](classifier, return_layers=return_layers)

    # the script's calculate_channel_attention, on a tiny attention classifier, against compat's batched one
    attention_classifier = Classifier(pretrained_backbone(), NUM_CLASSES)
    data_loader = DataLoader(train_dataset, batch_size=8, shuffle=False)
    criterion = nn_.CrossEntropyLoss()
    attention_classifier.eval()
    channel_weights = [[0] * get_attribute(attention_classifier, name).out_channels for name in return_layers]
    for i, (inputs, labels) in enumerate(data_loader):
        loss_0 = criterion(attention_classifier(inputs), labels)
        for layer_id, name in enumerate(return_layers):
            for j in range(get_attribute(attention_classifier, name).out_channels):
                tmp = attention_classifier.state_dict()[name + ".weight"][j,].clone()
                attention_classifier.state_dict()[name + ".weight"][j,] = 0.0
                difference = (criterion(attention_classifier(inputs), labels) - loss_0).detach().cpu().numpy().item()
                history_value = channel_weights[layer_id][j]
                channel_weights[layer_id][j] = 1.0 * (i * history_value + difference) / (i + 1)
                attention_classifier.state_dict()[name + ".weight"][j,] = tmp
    script_attention = []
    for weight in channel_weights:
        weight = np.array(weight)
        weight = (weight - np.mean(weight)) / np.std(weight)
        script_attention.append(F.softmax(torch_.from_numpy(weight).float() / 5, dim=0).detach())
    attention = ns["calculate_channel_attention"](attention_classifier, return_layers, data_loader)
    for ours, theirs in zip(attention, script_attention):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)

    regularizations = {
        "l2_sp": ns["SPRegularization"](source_classifier.backbone, classifier.backbone),
        "feature_map": ns["BehavioralRegularization"](),
        "attention_feature_map": ns["AttentionBehavioralRegularization"](attention),
    }
    head_regularization = ns["L2Regularization"](nn_.ModuleList([classifier.head, classifier.bottleneck]))
    train_iter = iter(DataLoader(train_dataset, batch_size=8, shuffle=True, drop_last=True))
    classifier.train()
    for step in range(2):
        x, label = next(train_iter)
        intermediate_output_s, output_s = source_getter(x)
        intermediate_output_t, output_t = target_getter(x)
        y, f = output_t
        terms = {
            kind: reg() if kind == "l2_sp" else reg(intermediate_output_s, intermediate_output_t)
            for kind, reg in regularizations.items()
        }
        if step == 0:  # the fine-tuned network starts at the pretrained one
            assert all(v.item() == 0.0 for v in terms.values())
        else:
            assert all(v.item() > 0.0 for v in terms.values())
        loss = F.cross_entropy(y, label) + 0.01 * sum(terms.values()) + 0.01 * head_regularization()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_bss_script(one_thread):
    from finereg.compat.tllib.bi_tuning import ClassifierBase as Classifier
    from finereg.compat.tllib.bss import BatchSpectralShrinkage

    classifier = Classifier(pretrained_backbone(), NUM_CLASSES)
    bss_module = BatchSpectralShrinkage(k=1)
    optimizer = torch.optim.SGD(classifier.get_parameters(0.01), momentum=0.9, weight_decay=5e-4, nesterov=True)
    classifier.train()
    for x, label in DataLoader(dataset(), batch_size=8, shuffle=True, drop_last=True):
        y, f = classifier(x)
        bss_loss = bss_module(f)
        s = torch.svd(f.t()).S  # tllib's computation
        torch.testing.assert_close(bss_loss, s[-1] ** 2, rtol=1e-4, atol=1e-6)
        loss = F.cross_entropy(y, label) + 0.001 * bss_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lwf_script(one_thread):
    from finereg.compat.tllib.knowledge_distillation import KnowledgeDistillationLoss
    from finereg.compat.tllib.lwf import Classifier, collect_pretrain_labels

    train_dataset = dataset()
    train_loader = DataLoader(train_dataset, batch_size=8, shuffle=False, drop_last=False)
    backbone = pretrained_backbone()
    classifier = Classifier(backbone, NUM_CLASSES, head_source=backbone.copy_head(), pool_layer=None, finetune=True)
    kd = KnowledgeDistillationLoss(3.0)
    source_classifier = nn.Sequential(classifier.backbone, classifier.pool_layer, classifier.head_source)
    pretrain_labels = collect_pretrain_labels(train_loader, source_classifier, "cpu")
    assert pretrain_labels.shape == (len(train_dataset), SOURCE_CLASSES)
    train_dataset = CombineDataset([train_dataset, TensorDataset(pretrain_labels)])
    train_loader = DataLoader(train_dataset, batch_size=8, shuffle=True, drop_last=True)
    optimizer = torch.optim.SGD(classifier.get_parameters(0.01), momentum=0.9, weight_decay=5e-4, nesterov=True)
    classifier.train()
    for i, (x, label_t, label_s) in enumerate(train_loader):
        y_s, y_t = classifier(x)
        src_loss = kd(y_s, label_s)
        if i == 0:
            assert src_loss.item() == pytest.approx(0.0, abs=1e-6)  # the source head reproduces its own labels
        loss = F.cross_entropy(y_t, label_t) + 4.0 * src_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_co_tuning_script_on_a_subset_with_missing_classes(tmp_path, one_thread):
    """``co_tuning.py -sc 1``: a random subset of the training set where some classes have no sample."""
    from finereg.compat.tllib.co_tuning import Classifier, CoTuningLoss, Relationship

    full = dataset()
    samples = [i for i in range(len(full)) if full[i][1] != 1][:6]  # class 1 left out
    train_dataset, determin_train_dataset = Subset(full, samples), Subset(full, samples)
    train_loader = DataLoader(train_dataset, batch_size=3, shuffle=True, drop_last=True)
    determin_train_loader = DataLoader(determin_train_dataset, batch_size=3, shuffle=False, drop_last=False)
    backbone = pretrained_backbone()
    classifier = Classifier(backbone, NUM_CLASSES, head_source=backbone.copy_head(), pool_layer=None, finetune=True)
    optimizer = torch.optim.SGD(classifier.get_parameters(0.01), momentum=0.9, weight_decay=5e-4, nesterov=True)
    source_classifier = nn.Sequential(classifier.backbone, classifier.pool_layer, classifier.head_source)
    with pytest.warns(FineregWarning, match="have no sample"):
        relationship = Relationship(determin_train_loader, source_classifier, "cpu", str(tmp_path / "relationship.npy"))
    co_tuning_loss = CoTuningLoss()
    classifier.train()
    for x, label_t in train_loader:
        label_s = torch.from_numpy(relationship[label_t]).float()
        y_s, y_t = classifier(x)
        src_loss = co_tuning_loss(y_s, label_s)
        assert torch.isfinite(src_loss)
        loss = F.cross_entropy(y_t, label_t) + 2.3 * src_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    again = Relationship(determin_train_loader, source_classifier, "cpu", str(tmp_path / "relationship.npy"))
    np.testing.assert_array_equal(again.relationship, relationship.relationship)  # loaded from the cache


def test_bi_tuning_script(one_thread):
    from finereg.compat.tllib.bi_tuning import BiTuning, Classifier

    # --projection-dim keeps its default (128): the script builds the key encoder with the default
    classifier_q = Classifier(pretrained_backbone(), NUM_CLASSES, pool_layer=None, projection_dim=128, finetune=True)
    classifier_k = Classifier(pretrained_backbone(), NUM_CLASSES, pool_layer=None)
    bituning = BiTuning(classifier_q, classifier_k, NUM_CLASSES, K=4, m=0.999, T=0.07)
    optimizer = torch.optim.SGD(
        classifier_q.get_parameters(0.01), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    classifier_criterion = torch.nn.CrossEntropyLoss()
    contrastive_criterion = torch.nn.KLDivLoss(reduction="batchmean")
    bituning.train()
    data = dataset()
    for x, labels in DataLoader(data, batch_size=6, shuffle=True, drop_last=True):
        img_q, img_k = x + 0.05 * torch.randn_like(x), x + 0.05 * torch.randn_like(x)  # MultipleApply's two views
        y, logits_z, logits_y, bituning_labels = bituning(img_q, img_k, labels)
        cls_loss = classifier_criterion(y, labels)
        contrastive_loss = contrastive_criterion(logits_z, bituning_labels) + contrastive_criterion(
            logits_y, bituning_labels
        )
        loss = cls_loss + contrastive_loss * 1.0
        assert torch.isfinite(loss) and logits_z.shape == (6, 1 + NUM_CLASSES * 4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert classifier_q.eval()(x).shape == (len(x), NUM_CLASSES)
