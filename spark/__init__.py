"""spark: the SparK model layer (sparse encoder, decoder, loss) and the spark-pretrain command."""
from .decoder import LightDecoder
from .model import SparK
from .sparse_encoder import UnsupportedLayerError, sparse_encoder_

__all__ = ["SparK", "LightDecoder", "UnsupportedLayerError", "sparse_encoder_"]
