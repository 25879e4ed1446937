"""Face alignment: MTCNN detection, the similarity warp to the template, the crop cache."""
