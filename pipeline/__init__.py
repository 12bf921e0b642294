"""Fashion visual search: a catalogue of photos into CLIP embeddings, look-alike items, person crops
and the items worn by people in a video. `main.py` is the command line; see README "How it fits
together" for the stage each module holds."""
