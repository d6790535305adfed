"""The text tower: BERT item encoder, user encoder, Lightning training loop, scorer."""
