"""The sharing round of CN112217639B as pure, synchronous code: no I/O, no clock."""
