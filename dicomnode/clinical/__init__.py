"""Clinical logic: the patient registry and the pairing of pre- and post-operative studies."""
