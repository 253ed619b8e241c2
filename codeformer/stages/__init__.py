"""Pipeline stages, one job each: prepare, detect, align, restore, paste."""
