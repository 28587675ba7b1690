"""Files shipped with the package (the embedded demo model under demo/)."""
