"""V4 chat wire format: encoding messages to prompt text and parsing DSML completions."""
