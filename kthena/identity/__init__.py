"""Who is calling: verified JWT subjects, trusted headers, or anonymous."""
