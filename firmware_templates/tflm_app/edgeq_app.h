// edgeq_app.h: the two entry points of the edgeq TFLM app (main.cc), for main() or an Arduino sketch.
#ifndef EDGEQ_APP_H_
#define EDGEQ_APP_H_

// Build the interpreter and run one inference on a zero input; 0 on success.
int edgeq_app_setup(void);

// Serve edgeq's serial evaluation protocol; never returns.
void edgeq_app_serve(void);

#endif  // EDGEQ_APP_H_
