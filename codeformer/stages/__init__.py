"""Pipeline stages, one job each: prepare, detect, align, restore, parse, paste (and warp, its exact warp)."""
