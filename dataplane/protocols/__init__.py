"""Protocol codecs: sans-IO state machines, bytes in, events out."""
