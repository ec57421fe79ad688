"""The `onerec` command line, outside the library: parse options, call one library function, print."""
