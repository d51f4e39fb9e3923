"""Everything that learns or decodes: semantic IDs, the trie, the lightweight OneRec, OneRec-Think."""
