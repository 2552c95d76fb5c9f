"""Gallery search: feature files (what ``cgpn extract`` writes) and a FAISS index over them."""

from cgpn.retrieval.features import FeatureFile, load_features, parse_market_names, save_features
from cgpn.retrieval.index import GalleryIndex, IndexSettings

__all__ = ["FeatureFile", "GalleryIndex", "IndexSettings", "load_features", "parse_market_names", "save_features"]
