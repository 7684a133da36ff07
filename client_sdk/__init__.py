"""Client SDK: run next to a private black-box expert; load banks and adapted models."""
