"""Source-image retrieval for selective joint fine-tuning (Ge & Yu, CVPR 2017, §3).

Pipeline: a filter bank (:func:`gabor_filter_bank`, or :func:`source_filter_bank` on the source
model) -> equal-mass bin edges from the target domain (:func:`fit_bin_edges`) -> per-image
histogram descriptors, cached on disk (:func:`describe_folder`) -> exact K-NN under the weighted
symmetric KL of eq. (1) (:func:`knn`, :func:`retrieve`) -> per-target neighbour counts that grow
for hard samples over the rounds (:class:`HardSampleSchedule`, eq. 2-3).

The source pool (:func:`scan_pool`), the memoised per-(pool, bank, target) search
(:func:`get_retrieval`) and the joint trainer (:func:`train_joint`, same signature as
``autotl.train.train_model``) build on them; ``autotl.retrieval.strategy`` is the strategy plug-in.
"""

from .descriptors import (
    DEFAULT_EPS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_N_BINS,
    Described,
    describe_folder,
    fit_bin_edges,
    histograms,
    iter_image_batches,
    load_image,
    load_images,
    responses_to_histograms,
)
from .filterbanks import (
    ConvFilterBank,
    GaborFilterBank,
    GaborParams,
    SourceConvStages,
    filter_weights,
    gabor_bank,
    gabor_filter_bank,
    gabor_params,
    source_conv_bank,
    source_filter_bank,
)
from .joint import JointData, joint_step_loss, random_neighbours, train_joint, write_retrieval_csv
from .knn import KnnResult, combine_banks, knn, pairwise_symmetric_kl, retrieve
from .neighbours import BANKS, PoolRetrieval, create_banks, get_retrieval, retrieval_stats
from .pool import SourcePool, pool_class_weights, scan_pool
from .schedule import HardSampleSchedule, prediction_entropy, selected_pool_indices

__all__ = [
    "BANKS",
    "ConvFilterBank",
    "DEFAULT_EPS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_N_BINS",
    "Described",
    "GaborFilterBank",
    "GaborParams",
    "HardSampleSchedule",
    "JointData",
    "KnnResult",
    "PoolRetrieval",
    "SourceConvStages",
    "SourcePool",
    "combine_banks",
    "create_banks",
    "describe_folder",
    "filter_weights",
    "fit_bin_edges",
    "gabor_bank",
    "gabor_filter_bank",
    "gabor_params",
    "get_retrieval",
    "histograms",
    "iter_image_batches",
    "joint_step_loss",
    "knn",
    "load_image",
    "load_images",
    "pairwise_symmetric_kl",
    "pool_class_weights",
    "prediction_entropy",
    "random_neighbours",
    "responses_to_histograms",
    "retrieval_stats",
    "retrieve",
    "scan_pool",
    "selected_pool_indices",
    "source_conv_bank",
    "source_filter_bank",
    "train_joint",
    "write_retrieval_csv",
]
