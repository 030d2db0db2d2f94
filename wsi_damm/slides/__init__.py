"""Slide readers behind one interface; see `Slide`."""

from wsi_damm.slides.base import Level, Slide
from wsi_damm.slides.open import open_file
from wsi_damm.slides.roles import ROLES, ChannelRef, RoleSlide, SlideSpec, parse_channel_map, specs_from_manifest, specs_from_paths

__all__ = [
    "ROLES",
    "ChannelRef",
    "Level",
    "RoleSlide",
    "Slide",
    "SlideSpec",
    "open_file",
    "parse_channel_map",
    "specs_from_manifest",
    "specs_from_paths",
]
