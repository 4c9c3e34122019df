/* A transformer that dereferences NULL: the update must be refused. */
#include "upstare_transformers.h"

int xf_crash(const struct account__old *old, struct account *new)
{
    volatile long *nowhere = 0;
    new->balance = old->deposits + *nowhere;
    return 0;
}
