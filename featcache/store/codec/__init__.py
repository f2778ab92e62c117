"""Storage codecs of the dense arrays, registered by name: ``f16`` (default), ``f32``, ``int8-phis``, ``int4-pca``.

``base`` holds the contract (:class:`Codec`) and the registry; one file per kind of codec holds
its classes. Importing this package registers them. A view names its codec in its attrs
(``ViewSpec.codec``); ``ViewSpec.codec_type`` is the class, ``codec_type.open(view)`` the codec
ready to encode and decode.
"""

from featcache.store.codec import floats, int4_pca, int8_phis  # noqa: F401  (registration)
from featcache.store.codec.base import (QUANTIZATION, SPACES, Codec, check_space, codec_from_attrs, codec_named,
                                        codec_names, register_codec)
from featcache.store.codec.floats import F16, F32
from featcache.store.codec.int4_pca import Int4Pca
from featcache.store.codec.int8_phis import LEVELS, Int8Phis, compand, expand

__all__ = ["F16", "F32", "LEVELS", "QUANTIZATION", "SPACES", "Codec", "Int4Pca", "Int8Phis", "check_space",
           "codec_from_attrs", "codec_named", "codec_names", "compand", "expand", "register_codec"]
