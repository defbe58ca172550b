"""Source-image retrieval for selective joint fine-tuning (Ge & Yu, CVPR 2017, §3.2).

Pipeline: a filter bank (:func:`gabor_filter_bank`, or :func:`source_filter_bank` on the source
model) -> equal-mass bin edges from the target domain (:func:`fit_bin_edges`) -> per-image
histogram descriptors, cached on disk (:func:`describe_folder`) -> exact K-NN under the weighted
symmetric KL of eq. (1) (:func:`knn`, :func:`retrieve`) -> per-target neighbour counts that grow
for hard samples over the rounds (:class:`HardSampleSchedule`, eq. 2-3).
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
    FilterBank,
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
from .knn import KnnResult, combine_banks, knn, pairwise_symmetric_kl, retrieve
from .schedule import HardSampleSchedule, prediction_entropy, selected_pool_indices

__all__ = [
    "ConvFilterBank",
    "DEFAULT_EPS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_N_BINS",
    "Described",
    "FilterBank",
    "GaborFilterBank",
    "GaborParams",
    "HardSampleSchedule",
    "KnnResult",
    "SourceConvStages",
    "combine_banks",
    "describe_folder",
    "filter_weights",
    "fit_bin_edges",
    "gabor_bank",
    "gabor_filter_bank",
    "gabor_params",
    "histograms",
    "iter_image_batches",
    "knn",
    "load_image",
    "load_images",
    "pairwise_symmetric_kl",
    "prediction_entropy",
    "responses_to_histograms",
    "retrieve",
    "selected_pool_indices",
    "source_conv_bank",
    "source_filter_bank",
]
