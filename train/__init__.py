"""Student training from the cache (DESIGN.md §5): arrives with its issue; nothing here yet."""
