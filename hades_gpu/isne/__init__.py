"""ISNE (Kiss & Szűcs 2024): h(v) = mean of neighbours' θ, skip-gram loss over random walks."""

from hades_gpu.isne.checkpoint import IsneCheckpoint, load_checkpoint, save_checkpoint
from hades_gpu.isne.inference import infer_from_checkpoint, neighbor_mean
from hades_gpu.isne.model import ISNE, skipgram_loss
from hades_gpu.isne.sampling import CSRGraph, random_walks, sample_neighbors
from hades_gpu.isne.trainer import TrainResult, train_isne

__all__ = ["ISNE", "IsneCheckpoint", "CSRGraph", "TrainResult", "infer_from_checkpoint", "load_checkpoint",
           "neighbor_mean", "random_walks", "sample_neighbors", "save_checkpoint", "skipgram_loss", "train_isne"]
