"""spark: the SparK model layer (sparse encoder, decoder, loss) and the spark-pretrain command."""
